//! The switch's own endpoint on a VLAN: a smoltcp interface with the VLAN's `service_ip`,
//! which answers ARP and ICMP echo. Tenants ping it as their gateway; operators use it to
//! probe each VLAN's data path.

use std::collections::VecDeque;

use smoltcp::iface::{Config, Interface, SocketSet};
use smoltcp::phy::{self, ChecksumCapabilities, Device, DeviceCapabilities, Medium};
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpAddress, IpCidr};

use crate::wire::frame::Mac;

/// In-memory frames in and out of the interface, like smoltcp's loopback device.
#[derive(Default)]
struct Queues {
    rx: VecDeque<Vec<u8>>,
    tx: VecDeque<Vec<u8>>,
    mtu: usize,
}

struct RxToken(Vec<u8>);
struct TxToken<'a>(&'a mut VecDeque<Vec<u8>>);

impl phy::RxToken for RxToken {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut buf = vec![0u8; len];
        let r = f(&mut buf);
        self.0.push_back(buf);
        r
    }
}

impl Device for Queues {
    type RxToken<'a> = RxToken;
    type TxToken<'a> = TxToken<'a>;

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.max_transmission_unit = self.mtu;
        caps.medium = Medium::Ethernet;
        caps.checksum = ChecksumCapabilities::default();
        caps
    }

    fn receive(&mut self, _t: Instant) -> Option<(RxToken, TxToken<'_>)> {
        let frame = self.rx.pop_front()?;
        Some((RxToken(frame), TxToken(&mut self.tx)))
    }

    fn transmit(&mut self, _t: Instant) -> Option<TxToken<'_>> {
        Some(TxToken(&mut self.tx))
    }
}

pub struct ServicePort {
    pub vlan: u16,
    pub mac: Mac,
    iface: Interface,
    queues: Queues,
    sockets: SocketSet<'static>,
    started: std::time::Instant,
}

impl ServicePort {
    /// The service endpoint's MAC on `vlan`: locally administered, unique per VLAN.
    pub fn mac_for(vlan: u16) -> Mac {
        let [hi, lo] = vlan.to_be_bytes();
        Mac([0x02, 0x76, 0x73, 0x00, hi, lo])
    }

    pub fn new(vlan: u16, addr: std::net::Ipv4Addr, prefix_len: u8) -> ServicePort {
        let mac = Self::mac_for(vlan);
        let mut queues = Queues {
            mtu: 1514,
            ..Queues::default()
        };
        let started = std::time::Instant::now();
        let config = Config::new(HardwareAddress::Ethernet(EthernetAddress(mac.0)));
        let mut iface = Interface::new(config, &mut queues, Instant::from_micros(0));
        iface.update_ip_addrs(|addrs| {
            let o = addr.octets();
            // Cannot fail: the list is empty and holds several addresses.
            let _ = addrs.push(IpCidr::new(
                IpAddress::v4(o[0], o[1], o[2], o[3]),
                prefix_len,
            ));
        });
        ServicePort {
            vlan,
            mac,
            iface,
            queues,
            sockets: SocketSet::new(vec![]),
            started,
        }
    }

    /// Hand the interface one untagged frame; return the frames it answers with.
    pub fn input(&mut self, frame: Vec<u8>) -> Vec<Vec<u8>> {
        self.queues.rx.push_back(frame);
        let now = Instant::from_micros(self.started.elapsed().as_micros() as i64);
        self.iface.poll(now, &mut self.queues, &mut self.sockets);
        self.queues.tx.drain(..).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use smoltcp::wire::{
        ArpOperation, ArpPacket, ArpRepr, EthernetFrame, EthernetProtocol, EthernetRepr,
        Icmpv4Packet, Icmpv4Repr, IpProtocol, Ipv4Address, Ipv4Packet, Ipv4Repr,
    };

    const GUEST: [u8; 6] = [2, 0, 0, 0, 0, 1];

    fn eth(dst: [u8; 6], proto: EthernetProtocol, payload_len: usize) -> (Vec<u8>, EthernetRepr) {
        let repr = EthernetRepr {
            src_addr: EthernetAddress(GUEST),
            dst_addr: EthernetAddress(dst),
            ethertype: proto,
        };
        (vec![0u8; repr.buffer_len() + payload_len], repr)
    }

    #[test]
    fn answers_arp_and_ping() {
        let mut s = ServicePort::new(10, "10.0.10.254".parse().expect("ip"), 24);
        let guest_ip = Ipv4Address::new(10, 0, 10, 1);
        let svc_ip = Ipv4Address::new(10, 0, 10, 254);

        let arp = ArpRepr::EthernetIpv4 {
            operation: ArpOperation::Request,
            source_hardware_addr: EthernetAddress(GUEST),
            source_protocol_addr: guest_ip,
            target_hardware_addr: EthernetAddress([0; 6]),
            target_protocol_addr: svc_ip,
        };
        let (mut buf, repr) = eth([0xff; 6], EthernetProtocol::Arp, arp.buffer_len());
        let mut f = EthernetFrame::new_unchecked(&mut buf);
        repr.emit(&mut f);
        arp.emit(&mut ArpPacket::new_unchecked(f.payload_mut()));
        let out = s.input(buf);
        assert_eq!(out.len(), 1, "one ARP reply");
        let f = EthernetFrame::new_checked(&out[0][..]).expect("frame");
        assert_eq!(f.src_addr(), EthernetAddress(ServicePort::mac_for(10).0));
        let reply =
            ArpRepr::parse(&ArpPacket::new_checked(f.payload()).expect("arp")).expect("arp");
        assert!(matches!(
            reply,
            ArpRepr::EthernetIpv4 {
                operation: ArpOperation::Reply,
                ..
            }
        ));

        let icmp = Icmpv4Repr::EchoRequest {
            ident: 7,
            seq_no: 1,
            data: b"ping",
        };
        let ip = Ipv4Repr {
            src_addr: guest_ip,
            dst_addr: svc_ip,
            next_header: IpProtocol::Icmp,
            payload_len: icmp.buffer_len(),
            hop_limit: 64,
        };
        let (mut buf, repr) = eth(
            ServicePort::mac_for(10).0,
            EthernetProtocol::Ipv4,
            ip.buffer_len() + icmp.buffer_len(),
        );
        let caps = ChecksumCapabilities::default();
        let mut f = EthernetFrame::new_unchecked(&mut buf);
        repr.emit(&mut f);
        let mut p = Ipv4Packet::new_unchecked(f.payload_mut());
        ip.emit(&mut p, &caps);
        icmp.emit(&mut Icmpv4Packet::new_unchecked(p.payload_mut()), &caps);
        let out = s.input(buf);
        assert_eq!(out.len(), 1, "one echo reply");
        let f = EthernetFrame::new_checked(&out[0][..]).expect("frame");
        assert_eq!(f.dst_addr(), EthernetAddress(GUEST));
        let p = Ipv4Packet::new_checked(f.payload()).expect("ip");
        assert_eq!(p.dst_addr(), guest_ip);
        let reply = Icmpv4Repr::parse(
            &Icmpv4Packet::new_checked(p.payload()).expect("icmp"),
            &caps,
        )
        .expect("icmp");
        assert!(matches!(
            reply,
            Icmpv4Repr::EchoReply {
                ident: 7,
                seq_no: 1,
                ..
            }
        ));
    }
}
