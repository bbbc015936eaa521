"""`make bench`: throughput of AdaParse and RE-Net, the levers that give it, and the input pipeline.

  python -m benchmarks.run [--quick]      # appends a dated section to BENCHMARKS.md

Modules:
  common       environment (device, date, commit), timing, compiled stats, peak matmul, FLOP counts
  model_bench  training and inference img/s, FLOPs per image, MFU, compile time, memory
  levers       each throughput lever on and off
  data_bench   prepare and loader throughput (the input pipeline)
  run          the entry point: choose the rows, run them, write BENCHMARKS.md
"""
