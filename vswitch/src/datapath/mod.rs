//! A frame's way through the switch, one file per step: `ingress` takes it from its
//! guest's transmit ring, `forward` decides where it goes, `egress` puts it into each
//! destination's receive ring.

pub mod egress;
pub mod forward;
pub mod ingress;
