"""Tree data: packing into one depth-first sequence, flattening to rows, tile skip lists, the C++ bridge."""
