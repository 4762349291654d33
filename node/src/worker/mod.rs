//! Running a root service as a program.

/// Placeholder until written.
pub struct Worker;
