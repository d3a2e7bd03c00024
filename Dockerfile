# The runtime image of streamrec: the flow and the tools, without torch.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY streamrec streamrec
COPY flows flows
COPY state state
COPY model model
COPY tools tools
COPY bench bench
COPY data data
RUN pip install --no-cache-dir .
ENV STREAMREC_DATA_DIR=/app/data/ml-latest-small \
    STREAMREC_MODEL_DIR=/app/model/artifacts
CMD ["streamrec", "run"]
