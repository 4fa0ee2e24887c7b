"""The decode runtime: a lean greedy/sampling decode loop on the CPU kernels (decode.py) and the side-by-side
peer (llama.cpp, llamacpp.py) that `sparsecraft bench --vs llama.cpp` and bench/decode.py measure against."""
