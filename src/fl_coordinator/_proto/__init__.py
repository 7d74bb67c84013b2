"""Generated protobuf and purerpc code: do not edit, run scripts/gen-protos."""
