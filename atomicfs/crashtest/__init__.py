"""The crash-consistency explorer (`atomicfs crashtest`) and the demo's instrument.

A user of the filesystem, not part of it: it mounts atomicfs (or recovers images through
its Volume) and reads device recordings, and nothing in the runtime package imports it.

explorer   the rounds of `atomicfs crashtest`: record, draw crash states, check; kills
recording  the one reader of device recordings (format: native/atomicfs_native.h)
states     crash states drawn from a recording, and their images
check      recover a state (Volume or real mount), read it, judge it, fsck it
env        working directories, loop devices, the XFS host, real mounts
workloads  what runs on the mount, and the oracles over its history
blockdev   a recording block device for any filesystem (the demo's ext4 side)
compare    ext4 against atomicfs under the same power cuts (`python -m atomicfs.demo`)
"""
