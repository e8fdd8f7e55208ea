//! AF_PACKET TPACKET_V3 receive rings with `PACKET_FANOUT_HASH` (being written).
