# The runtime image of streamrec: the flow and the tools, without torch.
# The base is pinned by its exact tag (CPython 3.11.14 on Debian 12, the platform
# requirements.lock is resolved for) and by the digest of that tag's multi-architecture
# index, so that a rebuild starts from the same bytes; move both together.
FROM python:3.11.14-slim-bookworm@sha256:65a93d69fa75478d554f4ad27c85c1e69fa184956261b4301ebaf6dbb0a3543d

# The flow runs as a fixed unprivileged uid and gid (10001), which hosts and orchestrators
# can grant volumes to. /var/lib/streamrec holds its state: a volume mounted there starts
# with this owner.
RUN groupadd --system --gid 10001 streamrec \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /var/lib/streamrec \
      --shell /usr/sbin/nologin streamrec \
 && install -d -o 10001 -g 10001 -m 0750 \
      /var/lib/streamrec /var/lib/streamrec/state /var/lib/streamrec/recovery

WORKDIR /app
# Dependencies first, each checked against its sha256 in the lock (a layer rebuilt only
# when the lock changes); then streamrec itself, with nothing fetched (the lock holds the
# build backend).
COPY requirements.lock ./
RUN pip install --no-cache-dir --require-hashes -r requirements.lock
COPY pyproject.toml README.md ./
COPY streamrec streamrec
COPY flows flows
COPY state state
COPY model model
COPY tools tools
COPY bench bench
COPY data data
# The served model directory belongs to the flow's user, like its state.
RUN pip install --no-cache-dir --no-deps --no-build-isolation . \
 && chown -R 10001:10001 /app/model/artifacts
ENV STREAMREC_DATA_DIR=/app/data/ml-latest-small \
    STREAMREC_MODEL_DIR=/app/model/artifacts \
    STREAMREC_STATE_DIR=/var/lib/streamrec/state \
    STREAMREC_RECOVERY_DIR=/var/lib/streamrec/recovery
USER 10001:10001
CMD ["streamrec", "run"]
