"""The hive-relay client SDK: seal, send and follow end-to-end-encrypted envelopes."""
