//! The root package holds only the workspace's end-to-end tests and benchmarks.
