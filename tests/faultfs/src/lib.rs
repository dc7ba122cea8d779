//! faultfs: fault-injecting FUSE filesystem for StemeDB reliability tests.
