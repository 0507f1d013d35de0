"""Generated protobuf and gRPC modules of the membroker v1 wire (do not edit)."""
