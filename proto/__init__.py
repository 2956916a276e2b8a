"""Generated gRPC/protobuf code for proto/tensorcache.proto (scripts/gen_proto.py)."""
