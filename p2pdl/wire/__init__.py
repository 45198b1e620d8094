"""The frame codec: header, msgpack body, lz4, every receiver check. No I/O."""
