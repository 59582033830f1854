//! GGUF block quantization formats (Q4_1, Q8_0): packing and unpacking.
