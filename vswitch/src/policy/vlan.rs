//! VLAN rules: which VLAN a frame belongs to when it enters a port, and in what form it
//! leaves one.

use crate::config::VlanMode;
use crate::wire::copy::Egress;

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IngressError {
    #[error("tagged frame (VLAN {0}) on an access port")]
    TaggedOnAccess(u16),
    #[error("VLAN {0} is not allowed on this trunk")]
    NotAllowed(u16),
    #[error("untagged frame on a trunk without a native VLAN")]
    NoNative,
}

// A trunk's `allowed` list is sorted and includes its native VLAN (see config.rs).
impl VlanMode {
    /// The VLAN a frame with `tag` belongs to when it enters this port.
    pub fn ingress(&self, tag: Option<u16>) -> Result<u16, IngressError> {
        match (self, tag) {
            (VlanMode::Access(v), None) => Ok(*v),
            (VlanMode::Access(_), Some(t)) => Err(IngressError::TaggedOnAccess(t)),
            // A tagged frame on the native VLAN is accepted too, as OVS does.
            (VlanMode::Trunk { .. }, Some(t)) if self.carries(t) => Ok(t),
            (VlanMode::Trunk { .. }, Some(t)) => Err(IngressError::NotAllowed(t)),
            (VlanMode::Trunk { native, .. }, None) => native.ok_or(IngressError::NoNative),
        }
    }

    /// How a frame of `vlan` that arrived tagged (`tagged`) or not leaves this port. The
    /// caller checked `carries(vlan)`.
    pub fn egress(&self, vlan: u16, tagged: bool) -> Egress {
        let want_tag = match self {
            VlanMode::Access(_) => false,
            VlanMode::Trunk { native, .. } => *native != Some(vlan),
        };
        match (tagged, want_tag) {
            (true, true) | (false, false) => Egress::AsIs,
            (true, false) => Egress::Strip,
            (false, true) => Egress::Insert(vlan),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trunk(native: Option<u16>) -> VlanMode {
        let mut allowed = vec![10, 20];
        allowed.extend(native);
        allowed.sort_unstable();
        VlanMode::Trunk { allowed, native }
    }

    #[test]
    fn access_port() {
        let p = VlanMode::Access(10);
        assert_eq!(p.ingress(None), Ok(10));
        assert_eq!(p.ingress(Some(10)), Err(IngressError::TaggedOnAccess(10)));
        assert!(p.carries(10) && !p.carries(20));
        assert_eq!(p.egress(10, false), Egress::AsIs);
        assert_eq!(p.egress(10, true), Egress::Strip);
    }

    #[test]
    fn trunk_port() {
        let p = trunk(Some(1));
        assert_eq!(p.ingress(Some(10)), Ok(10));
        assert_eq!(p.ingress(Some(30)), Err(IngressError::NotAllowed(30)));
        assert_eq!(p.ingress(None), Ok(1));
        assert_eq!(p.ingress(Some(1)), Ok(1));
        assert!(p.carries(1) && p.carries(20) && !p.carries(30));
        assert_eq!(p.egress(10, false), Egress::Insert(10));
        assert_eq!(p.egress(10, true), Egress::AsIs);
        assert_eq!(p.egress(1, true), Egress::Strip);
        assert_eq!(p.egress(1, false), Egress::AsIs);
        assert_eq!(trunk(None).ingress(None), Err(IngressError::NoNative));
    }
}
