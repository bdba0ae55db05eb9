//! Fleet discovery end to end: provisioning files, DNS SRV against a tiny in-test DNS responder on loopback,
//! and the configured URL, in that order; broken answers and silent servers only ever fall through.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use cairn_agent::discovery::{discover, DiscoveryError, DiscoverySettings, ResolvConf, Source};
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const TIMEOUT: Duration = Duration::from_millis(200);
const CONFIGURED: &str = "https://configured.example:8443";

/// A query as the responder sees it.
struct Query {
    id: u16,
    /// Lower-case, without the trailing dot.
    name: String,
    /// The question section, to echo.
    question: Vec<u8>,
    /// Offset in the message of each label of the name, for compression pointers.
    label_offsets: Vec<usize>,
}

fn parse_query(msg: &[u8]) -> Option<Query> {
    let id = u16::from_be_bytes([*msg.first()?, *msg.get(1)?]);
    let mut pos = 12;
    let mut labels = Vec::new();
    let mut label_offsets = Vec::new();
    loop {
        let len = usize::from(*msg.get(pos)?);
        if len == 0 {
            break;
        }
        label_offsets.push(pos);
        labels.push(String::from_utf8_lossy(msg.get(pos + 1..pos + 1 + len)?).to_lowercase());
        pos += 1 + len;
    }
    let question = msg.get(12..pos + 5)?.to_vec();
    Some(Query {
        id,
        name: labels.join("."),
        question,
        label_offsets,
    })
}

/// An SRV record: priority, weight, port, target.
type Record = (u16, u16, u16, &'static str);

type Handler = dyn Fn(&Query) -> Vec<Vec<u8>> + Send + 'static;

/// A UDP DNS responder on 127.0.0.1: every query goes to the handler, whose datagrams are sent back in order.
struct Responder {
    addr: SocketAddr,
    asked: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Responder {
    fn start(handler: Box<Handler>) -> Self {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        let addr = socket.local_addr().unwrap();
        let asked = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (asked, stop) = (asked.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut buf = [0u8; 512];
                while !stop.load(Ordering::Relaxed) {
                    let Ok((n, peer)) = socket.recv_from(&mut buf) else {
                        continue;
                    };
                    let Some(q) = parse_query(&buf[..n]) else {
                        continue;
                    };
                    asked.lock().unwrap().push(q.name.clone());
                    for datagram in handler(&q) {
                        socket.send_to(&datagram, peer).unwrap();
                    }
                }
            })
        };
        Responder {
            addr,
            asked,
            stop,
            thread: Some(thread),
        }
    }

    /// Answers SRV for the names in `zone`, NXDOMAIN otherwise.
    fn zone(zone: Vec<(&'static str, Vec<Record>)>) -> Self {
        Responder::start(Box::new(move |q| {
            match zone.iter().find(|(name, _)| *name == q.name) {
                Some((_, records)) => {
                    let answers = records
                        .iter()
                        .map(|&(p, w, port, target)| srv_answer(q, p, w, port, target))
                        .collect::<Vec<_>>();
                    vec![response(q, 0x8180, &answers)]
                }
                None => vec![response(q, 0x8183, &[])],
            }
        }))
    }

    fn asked(&self) -> Vec<String> {
        self.asked.lock().unwrap().clone()
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn response(q: &Query, flags: u16, answers: &[Vec<u8>]) -> Vec<u8> {
    let mut m = Vec::new();
    m.extend_from_slice(&q.id.to_be_bytes());
    m.extend_from_slice(&flags.to_be_bytes());
    m.extend_from_slice(&1u16.to_be_bytes());
    m.extend_from_slice(&(answers.len() as u16).to_be_bytes());
    m.extend_from_slice(&[0, 0, 0, 0]);
    m.extend_from_slice(&q.question);
    for a in answers {
        m.extend_from_slice(a);
    }
    m
}

/// An SRV answer whose owner is a pointer to the question, and whose target is compressed when it ends in
/// the queried domain (`fleet.example.net` becomes the label `fleet` and a pointer to `example.net`).
fn srv_answer(q: &Query, priority: u16, weight: u16, port: u16, target: &str) -> Vec<u8> {
    let domain = q.name.splitn(3, '.').nth(2).unwrap();
    let mut rdata = Vec::new();
    rdata.extend_from_slice(&priority.to_be_bytes());
    rdata.extend_from_slice(&weight.to_be_bytes());
    rdata.extend_from_slice(&port.to_be_bytes());
    let (head, pointer) = match target.strip_suffix(domain) {
        Some(head) => (head.trim_end_matches('.'), Some(q.label_offsets[2])),
        None => (target.trim_end_matches('.'), None),
    };
    for label in head.split('.').filter(|l| !l.is_empty()) {
        rdata.push(label.len() as u8);
        rdata.extend_from_slice(label.as_bytes());
    }
    match pointer {
        Some(offset) => rdata.extend_from_slice(&[0xc0 | (offset >> 8) as u8, offset as u8]),
        None => rdata.push(0),
    }
    let mut a = vec![0xc0, 12];
    a.extend_from_slice(&33u16.to_be_bytes());
    a.extend_from_slice(&1u16.to_be_bytes());
    a.extend_from_slice(&60u32.to_be_bytes());
    a.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
    a.extend_from_slice(&rdata);
    a
}

struct Site {
    dir: tempfile::TempDir,
    settings: DiscoverySettings,
}

impl Site {
    /// Two provisioning paths (neither present), `resolv_conf` as given, DNS pointed at `dns`.
    fn new(resolv_conf: &str, dns: Option<SocketAddr>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let resolv = dir.path().join("resolv.conf");
        std::fs::write(&resolv, resolv_conf).unwrap();
        let settings = DiscoverySettings {
            configured_url: CONFIGURED.into(),
            provisioning_paths: vec![
                dir.path().join("run/cairn-provision.toml"),
                dir.path().join("boot/cairn-provision.toml"),
            ],
            srv: true,
            resolv_conf: resolv,
            dns_timeout: TIMEOUT,
            nameserver_override: dns,
            kept: Some(dir.path().join("data/provision.toml")),
        };
        Site { dir, settings }
    }

    /// Writes the second (boot partition) provisioning file.
    fn provision(&self, text: &str) -> PathBuf {
        let path = self.settings.provisioning_paths[1].clone();
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, text).unwrap();
        path
    }

    fn discover(&self) -> Result<Option<cairn_agent::discovery::Discovered>, DiscoveryError> {
        discover(&self.settings)
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

fn srv_source(name: &str) -> Source {
    Source::DnsSrv { name: name.into() }
}

#[test]
fn srv_record_names_the_fleet() {
    let dns = Responder::zone(vec![(
        "_cairn-enroll._tcp.example.net",
        vec![(10, 0, 8443, "fleet.example.net")],
    )]);
    let site = Site::new("search example.net\n", Some(dns.addr));
    let found = site.discover().unwrap().unwrap();
    assert_eq!(found.url, "https://fleet.example.net:8443");
    assert_eq!(found.source, srv_source("_cairn-enroll._tcp.example.net"));
    assert_eq!(found.site, None);
    assert_eq!(
        found.source.to_string(),
        "DNS SRV _cairn-enroll._tcp.example.net"
    );
}

#[test]
fn lowest_priority_wins() {
    let dns = Responder::zone(vec![(
        "_cairn-enroll._tcp.example.net",
        vec![
            (20, 100, 443, "backup.example.net"),
            (10, 1, 8443, "primary.elsewhere.example"),
        ],
    )]);
    let site = Site::new("search example.net\n", Some(dns.addr));
    for _ in 0..5 {
        let found = site.discover().unwrap().unwrap();
        assert_eq!(found.url, "https://primary.elsewhere.example:8443");
    }
}

#[test]
fn nxdomain_in_the_first_search_domain_then_found_in_the_second() {
    let dns = Responder::zone(vec![(
        "_cairn-enroll._tcp.corp.example",
        vec![(0, 0, 9443, "enroll.corp.example")],
    )]);
    let site = Site::new("search lab.example corp.example\n", Some(dns.addr));
    let found = site.discover().unwrap().unwrap();
    assert_eq!(found.url, "https://enroll.corp.example:9443");
    assert_eq!(found.source, srv_source("_cairn-enroll._tcp.corp.example"));
    assert_eq!(
        dns.asked(),
        vec![
            "_cairn-enroll._tcp.lab.example",
            "_cairn-enroll._tcp.corp.example"
        ]
    );
}

#[test]
fn nothing_in_dns_falls_through_to_the_configured_url() {
    let dns = Responder::zone(vec![]);
    let site = Site::new("search a.example b.example\n", Some(dns.addr));
    let found = site.discover().unwrap().unwrap();
    assert_eq!(found.url, CONFIGURED);
    assert_eq!(found.source, Source::Configured);
    assert_eq!(found.source.to_string(), "configuration");
    assert_eq!(dns.asked().len(), 2);
}

#[test]
fn a_silent_server_falls_through_within_one_retry_and_is_not_asked_again() {
    // Bound but never read: no ICMP refusal, just silence.
    let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
    let site = Site::new(
        "search a.example b.example c.example\n",
        Some(silent.local_addr().unwrap()),
    );
    let started = Instant::now();
    let found = site.discover().unwrap().unwrap();
    let took = started.elapsed();
    assert_eq!(found.source, Source::Configured);
    // One query and one retry for the first domain; the server is then written off for the others.
    assert!(took >= TIMEOUT * 2, "gave up after {took:?}");
    assert!(
        took < TIMEOUT * 2 + Duration::from_millis(600),
        "took {took:?}"
    );
}

#[test]
fn a_refusing_server_falls_through_at_once() {
    let closed = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = closed.local_addr().unwrap();
    drop(closed);
    let site = Site::new("search example.net\n", Some(addr));
    let started = Instant::now();
    assert_eq!(site.discover().unwrap().unwrap().source, Source::Configured);
    assert!(started.elapsed() < TIMEOUT * 2, "{:?}", started.elapsed());
}

#[test]
fn provisioning_file_beats_srv_and_configuration() {
    let dns = Responder::zone(vec![(
        "_cairn-enroll._tcp.example.net",
        vec![(10, 0, 8443, "fleet.example.net")],
    )]);
    let site = Site::new("search example.net\n", Some(dns.addr));
    let path = site.provision(
        "# written at the depot\nfleet_url = \"https://provisioned.example:7443\"\nsite = \"berlin-rack-3\"\n",
    );
    let found = site.discover().unwrap().unwrap();
    assert_eq!(found.url, "https://provisioned.example:7443");
    assert_eq!(found.source, Source::ProvisioningFile(path.clone()));
    assert_eq!(found.site.as_deref(), Some("berlin-rack-3"));
    assert_eq!(
        found.source.to_string(),
        format!("provisioning file {}", path.display())
    );
    assert!(dns.asked().is_empty(), "DNS was not consulted");
}

#[test]
fn the_stick_is_kept_so_the_box_finds_its_fleet_after_it_is_taken_out_and_a_new_stick_wins() {
    let site = Site::new("", None);
    let stick = site.provision("fleet_url = \"https://stick.example:8443\"\nsite = \"rack 3\"\n");
    let found = site.discover().unwrap().unwrap();
    assert_eq!(found.source, Source::ProvisioningFile(stick.clone()));
    let kept = site.path().join("data/provision.toml");
    assert_eq!(
        std::fs::read(&kept).unwrap(),
        std::fs::read(&stick).unwrap()
    );

    std::fs::remove_file(&stick).unwrap();
    let found = site.discover().unwrap().unwrap();
    assert_eq!(
        found.url, "https://stick.example:8443",
        "the stick is gone; the kept copy names the fleet"
    );
    assert_eq!(found.site.as_deref(), Some("rack 3"));
    assert_eq!(found.source, Source::ProvisioningFile(kept.clone()));

    // Moving the box: the new site's stick replaces the kept copy.
    site.provision("fleet_url = \"https://other.example\"\nsite = \"hall 2\"\n");
    assert_eq!(
        site.discover().unwrap().unwrap().url,
        "https://other.example"
    );
    std::fs::remove_file(&stick).unwrap();
    let found = site.discover().unwrap().unwrap();
    assert_eq!(
        (found.url.as_str(), found.site.as_deref()),
        ("https://other.example", Some("hall 2"))
    );

    // A kept copy that went bad does not block discovery: the configured URL still answers.
    std::fs::write(&kept, "fleet_url = 3\n").unwrap();
    assert_eq!(site.discover().unwrap().unwrap().url, CONFIGURED);
}

#[test]
fn the_first_provisioning_file_found_wins() {
    let site = Site::new("", None);
    site.provision("fleet_url = \"https://second.example\"\n");
    let first = site.settings.provisioning_paths[0].clone();
    std::fs::create_dir_all(first.parent().unwrap()).unwrap();
    std::fs::write(&first, "fleet_url = \"https://first.example\"\n").unwrap();
    let found = site.discover().unwrap().unwrap();
    assert_eq!(found.url, "https://first.example");
    assert_eq!(found.source, Source::ProvisioningFile(first));
}

#[test]
fn a_malformed_provisioning_file_is_an_error_naming_file_and_line() {
    let site = Site::new("search example.net\n", None);
    // The first path is malformed; a valid second file must not be used instead.
    let first = site.settings.provisioning_paths[0].clone();
    std::fs::create_dir_all(first.parent().unwrap()).unwrap();
    std::fs::write(
        &first,
        "fleet_url = \"https://f.example\"\nsite = \"rack\"\nfleet = \"typo\"\n",
    )
    .unwrap();
    site.provision("fleet_url = \"https://second.example\"\n");
    let err = site.discover().unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(&err, DiscoveryError::Provisioning { path, line: Some(3), .. } if *path == first),
        "{err:?}"
    );
    assert!(
        msg.starts_with(&format!("provisioning file {}, line 3:", first.display())),
        "{msg}"
    );
    assert!(msg.contains("`fleet`") && msg.contains("fix:"), "{msg}");

    std::fs::write(&first, "fleet_url = \"https://f.example\n").unwrap();
    let msg = site.discover().unwrap_err().to_string();
    assert!(msg.contains(", line 1:") && msg.contains("fix:"), "{msg}");
}

#[test]
fn an_http_url_in_a_provisioning_file_is_an_error() {
    let site = Site::new("", None);
    let path = site.provision("site = \"x\"\nfleet_url = \"http://fleet.example:8080\"\n");
    let err = site.discover().unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.starts_with(&format!("provisioning file {}, line 2:", path.display())),
        "{msg}"
    );
    assert!(msg.contains("not an https URL"), "{msg}");
}

#[test]
fn something_unreadable_at_a_provisioning_path_is_an_error() {
    let site = Site::new("", None);
    let path = site.settings.provisioning_paths[0].clone();
    std::fs::create_dir_all(&path).unwrap();
    let err = site.discover().unwrap_err();
    assert!(
        matches!(&err, DiscoveryError::Read { path: p, .. } if *p == path),
        "{err:?}"
    );
    assert!(err.to_string().contains(&path.display().to_string()));
}

#[test]
fn resolv_conf_search_domains_drive_the_lookup() {
    let text = "# Generated by dhcpcd\n\
                ; another comment style\n\
                domain dhcp.example\n\
                search lab.example corp.example. # site first\n\
                nameserver 192.0.2.53\n\
                nameserver 2001:db8::53\n\
                options edns0 trust-ad ndots:2\n";
    let conf = ResolvConf::parse(text);
    assert_eq!(conf.search, vec!["lab.example", "corp.example"]);
    assert_eq!(
        conf.nameservers,
        vec![
            "192.0.2.53:53".parse::<SocketAddr>().unwrap(),
            "[2001:db8::53]:53".parse().unwrap()
        ]
    );

    let dns = Responder::zone(vec![(
        "_cairn-enroll._tcp.corp.example",
        vec![(1, 1, 8443, "fleet.corp.example")],
    )]);
    let site = Site::new(text, Some(dns.addr));
    let found = site.discover().unwrap().unwrap();
    assert_eq!(found.url, "https://fleet.corp.example:8443");
    assert_eq!(
        dns.asked(),
        vec![
            "_cairn-enroll._tcp.lab.example",
            "_cairn-enroll._tcp.corp.example"
        ],
        "`domain` was replaced by the later `search`"
    );

    let site = Site::new("search old.example\ndomain dhcp.example\n", Some(dns.addr));
    site.discover().unwrap();
    assert_eq!(
        dns.asked().last().map(String::as_str),
        Some("_cairn-enroll._tcp.dhcp.example"),
        "a later `domain` replaces `search`"
    );
}

#[test]
fn malformed_dns_answers_are_no_answer() {
    let cases: Vec<(&str, Box<Handler>)> = vec![
        (
            "truncated",
            Box::new(|q: &Query| {
                let mut m = response(q, 0x8180, &[srv_answer(q, 1, 0, 443, "f.example.net")]);
                m.truncate(m.len() - 5);
                vec![m]
            }),
        ),
        (
            "pointer loop",
            Box::new(|q: &Query| {
                let mut m = response(q, 0x8180, &[srv_answer(q, 1, 0, 443, "f.example.net")]);
                let owner = 12 + q.question.len();
                m[owner + 1] = owner as u8;
                vec![m]
            }),
        ),
        (
            "target pointer loop",
            Box::new(|q: &Query| {
                // The SRV target is a pointer to itself.
                let mut m = response(q, 0x8180, &[srv_answer(q, 1, 0, 443, "x.other.example")]);
                let owner = 12 + q.question.len();
                let target = owner + 12 + 6;
                m.truncate(target);
                m.extend_from_slice(&[0xc0, target as u8]);
                m[owner + 10..owner + 12].copy_from_slice(&8u16.to_be_bytes());
                vec![m]
            }),
        ),
        (
            "wrong id",
            Box::new(|q: &Query| {
                let mut m = response(q, 0x8180, &[srv_answer(q, 1, 0, 443, "f.example.net")]);
                m[1] ^= 0xff;
                vec![m]
            }),
        ),
        (
            "truncation flag",
            Box::new(|q: &Query| {
                vec![response(
                    q,
                    0x8380,
                    &[srv_answer(q, 1, 0, 443, "f.example.net")],
                )]
            }),
        ),
        ("garbage", Box::new(|_: &Query| vec![vec![0xff; 3], vec![]])),
        (
            "server failure",
            Box::new(|q: &Query| vec![response(q, 0x8182, &[])]),
        ),
        (
            "bad target",
            Box::new(|q: &Query| {
                vec![response(
                    q,
                    0x8180,
                    &[srv_answer(q, 1, 0, 443, "a@b/c.example.org")],
                )]
            }),
        ),
    ];
    for (what, handler) in cases {
        let dns = Responder::start(handler);
        let site = Site::new("search example.net\n", Some(dns.addr));
        let found = site.discover().unwrap().unwrap();
        assert_eq!(found.source, Source::Configured, "{what}");
        assert!(!dns.asked().is_empty(), "{what}: the responder was asked");
    }
}

#[test]
fn a_stray_datagram_does_not_spoil_the_real_answer() {
    let dns = Responder::start(Box::new(|q: &Query| {
        let real = response(q, 0x8180, &[srv_answer(q, 1, 0, 443, "f.example.net")]);
        let mut stray = real.clone();
        stray[0] ^= 0x55;
        vec![stray, real]
    }));
    let site = Site::new("search example.net\n", Some(dns.addr));
    assert_eq!(
        site.discover().unwrap().unwrap().url,
        "https://f.example.net:443"
    );
}

#[test]
fn nothing_anywhere_is_none_and_a_bad_configured_url_is_an_error() {
    let mut site = Site::new("", None);
    site.settings.configured_url = String::new();
    assert_eq!(
        site.discover().unwrap(),
        None,
        "no search domain: DNS is skipped"
    );
    site.settings.resolv_conf = site.path().join("missing");
    assert_eq!(site.discover().unwrap(), None);
    site.settings.srv = false;
    assert_eq!(site.discover().unwrap(), None);

    site.settings.configured_url = "http://plain.example".into();
    let err = site.discover().unwrap_err();
    assert!(matches!(err, DiscoveryError::Configured { .. }), "{err:?}");
    assert!(err.to_string().contains("fleet.url"), "{err}");
}
