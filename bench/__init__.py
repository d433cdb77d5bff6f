"""Side-by-side benchmarks: atomicfs against kernel XFS, kernel ext4 and a null FUSE filesystem.

`make bench` (or `python -m bench`) runs them; `make profile` profiles the daemon.
"""
