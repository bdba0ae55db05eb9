//! Network ports and their links, from `sys/class/net` under the sysfs root. Only interfaces with a `device`
//! entry are ports a cable goes into; bridges, tunnels and loopback have none. Ports are numbered 1, 2, … in
//! name order, the way a tech counts the sockets on the back of a box whose NICs are named by slot.

use super::sysfs::SysRoot;
use std::net::IpAddr;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Port {
    /// 1-based, in interface name order.
    pub number: usize,
    pub interface: String,
    /// The cable is in and the other end answers (`carrier` = 1, or `operstate` up).
    pub link: bool,
    /// The port is administratively down (`operstate` is "down" and `flags` lacks IFF_UP): nothing a cable fixes.
    pub disabled: bool,
}

pub fn ports(sys: &SysRoot) -> Vec<Port> {
    let dir = sys.class("net");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter(|e| e.path().join("device").exists())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
        .into_iter()
        .enumerate()
        .map(|(i, name)| {
            let base = dir.join(&name);
            let read = |attr: &str| sys.attr(&base.join(attr)).unwrap_or_default();
            let flags =
                u32::from_str_radix(read("flags").trim_start_matches("0x"), 16).unwrap_or(1);
            // `carrier` cannot be read on an interface that is down; then operstate decides.
            let link = read("carrier") == "1" || read("operstate") == "up";
            Port {
                number: i + 1,
                interface: name,
                link,
                disabled: flags & 1 == 0,
            }
        })
        .collect()
}

/// The addresses of an interface, from the kernel (not sysfs): where the local page can be reached.
pub fn addresses(interface: &str) -> Vec<IpAddr> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    addrs
        .filter(|a| a.interface_name == interface)
        .filter_map(|a| {
            let addr = a.address?;
            if let Some(v4) = addr.as_sockaddr_in() {
                Some(IpAddr::V4(v4.ip()))
            } else {
                addr.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())).filter(
                    |ip| !matches!(ip, IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80),
                )
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn port(root: &Path, name: &str, carrier: Option<&str>, operstate: &str, flags: &str) {
        let d = root.join("sys/class/net").join(name);
        std::fs::create_dir_all(d.join("device")).unwrap();
        if let Some(c) = carrier {
            std::fs::write(d.join("carrier"), c).unwrap();
        }
        std::fs::write(d.join("operstate"), operstate).unwrap();
        std::fs::write(d.join("flags"), flags).unwrap();
    }

    #[test]
    fn ports_are_physical_interfaces_numbered_in_name_order() {
        let tmp = tempfile::tempdir().unwrap();
        port(tmp.path(), "eno2", Some("0"), "down", "0x1003");
        port(tmp.path(), "eno1", Some("1"), "up", "0x1003");
        port(tmp.path(), "eno3", None, "down", "0x1002");
        // A bridge has no `device`: not a port.
        std::fs::create_dir_all(tmp.path().join("sys/class/net/br0")).unwrap();
        let p = ports(&SysRoot::new(tmp.path().to_owned()));
        assert_eq!(
            p,
            vec![
                Port {
                    number: 1,
                    interface: "eno1".into(),
                    link: true,
                    disabled: false
                },
                Port {
                    number: 2,
                    interface: "eno2".into(),
                    link: false,
                    disabled: false
                },
                Port {
                    number: 3,
                    interface: "eno3".into(),
                    link: false,
                    disabled: true
                },
            ]
        );
    }

    #[test]
    fn no_net_class_is_no_ports() {
        let tmp = tempfile::tempdir().unwrap();
        assert!(ports(&SysRoot::new(tmp.path().to_owned())).is_empty());
    }

    #[test]
    fn loopback_has_an_address() {
        assert!(addresses("lo").iter().any(|a| a.is_loopback()));
        assert!(addresses("no-such-interface0").is_empty());
    }
}
