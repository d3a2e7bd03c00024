"""The same job as ``streamrec run``, written as a user of another framework would write it.

Each peer reads the events topic, validates each record with
``streamrec.contracts`` (invalid ones go to the dead-letter topic), keeps a
per-user session of the last ``STREAMREC_SESSION_LENGTH`` items stamped with
the source offset of the last event applied (a replayed event is answered,
not applied twice), scores it with the project's ``streamrec.model.serving.Recommender``
and writes a ``Recommendation`` keyed by user: the output contract of the
flow.  They are configured by the same ``STREAMREC_*`` variables, so the
benchmark starts them exactly as it starts the flow.

  bytewax_peer.py  stock Bytewax 0.21: KafkaSource/KafkaSink operators, stateful_map
  quix_peer.py     Quix Streams 3.x: StreamingDataFrame, RocksDB state with its changelog
  session.py       the session both peers keep (a plain value: each framework stores it)
"""
