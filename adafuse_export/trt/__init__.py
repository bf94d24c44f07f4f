"""TensorRT engine building (full TensorRT + plugin library, or TensorRT-RTX for portable graphs)."""
