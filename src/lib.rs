//! ringmail: a thread-per-core io_uring mail relay.
