//! Batched transmission of IP packets on raw sockets (being written).
