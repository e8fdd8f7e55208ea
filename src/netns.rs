//! Network namespaces for tests and the lab (being written).
