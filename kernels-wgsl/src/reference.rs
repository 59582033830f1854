//! Plain, obvious Rust twins of every kernel: the oracle for tests of both backends.
