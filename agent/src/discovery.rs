//! Fleet discovery: how `cairnd` finds its fleet backend with nobody typing anything. In precedence order:
//!
//! 1. A provisioning file on removable media or the boot partition: the first configured path that exists.
//!    A file that exists but cannot be read or is not valid is an error, never a silent fall-through: someone
//!    put it there on purpose, and the device must not enrol with a different fleet behind their back.
//! 2. DNS SRV `_cairn-enroll._tcp.<domain>` for each search domain in resolv.conf (DHCP fills it in). The
//!    lookup is a minimal UDP client of our own; a DNS failure of any kind only means "not found here".
//! 3. The configured `fleet.url`, unless empty.
//!
//! Whatever the source, the URL must pass [`FleetUrl::parse`] (https only). Trust does not come from here:
//! the fleet still has to present a certificate from the CA that ships in the image.

use crate::uplink::FleetUrl;
use std::io::Read;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6, UdpSocket};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The service label looked up under each search domain.
pub const SRV_PREFIX: &str = "_cairn-enroll._tcp";
/// Wait for one DNS query (one attempt at one server).
pub const DEFAULT_DNS_TIMEOUT: Duration = Duration::from_secs(2);
/// Where provisioning files are looked for, in order, unless configured otherwise.
pub const DEFAULT_PROVISIONING_PATHS: [&str; 3] = [
    "/run/cairn/provision/cairn-provision.toml",
    "/boot/cairn-provision.toml",
    "/boot/efi/cairn-provision.toml",
];

/// A provisioning file is a few lines; anything bigger is not one, and a stick must not exhaust memory.
const MAX_PROVISIONING_BYTES: u64 = 64 * 1024;
const MAX_SITE_CHARS: usize = 128;
/// As glibc: at most three name servers are used.
const MAX_NAMESERVERS: usize = 3;
/// As glibc's historical MAXDNSRCH; bounds the queries one discovery can send.
const MAX_SEARCH_DOMAINS: usize = 6;
/// Compression pointers followed within one name; real names need a handful.
const MAX_POINTER_HOPS: usize = 32;
/// CNAMEs followed from the queried name to the SRV records.
const MAX_CNAME_HOPS: usize = 8;
const TYPE_CNAME: u16 = 5;
const TYPE_SRV: u16 = 33;
const CLASS_IN: u16 = 1;
const RCODE_NXDOMAIN: u8 = 3;

const FIX_PROVISIONING: &str = "write it as `fleet_url = \"https://fleet.example.com:8443\"` and optionally \
                                `site = \"name\"`, nothing else; or remove the file to use DNS or the configuration";

#[derive(Debug, Clone)]
pub struct DiscoverySettings {
    /// `fleet.url`; empty means none.
    pub configured_url: String,
    /// Provisioning files in precedence order; the first that exists is used.
    pub provisioning_paths: Vec<PathBuf>,
    /// Whether to look up DNS SRV records at all.
    pub srv: bool,
    /// Where the search domains (and name servers) come from.
    pub resolv_conf: PathBuf,
    /// Wait for one DNS query; each server gets at most one retry.
    pub dns_timeout: Duration,
    /// Test hook: ask this server (any port) instead of resolv.conf's name servers.
    pub nameserver_override: Option<SocketAddr>,
    /// Where the last valid provisioning file is kept (on the data partition), so the box still finds its
    /// fleet after the stick is taken out; a newer stick replaces it. `None` keeps nothing.
    pub kept: Option<PathBuf>,
}

impl Default for DiscoverySettings {
    fn default() -> Self {
        DiscoverySettings {
            configured_url: String::new(),
            provisioning_paths: DEFAULT_PROVISIONING_PATHS
                .iter()
                .map(PathBuf::from)
                .collect(),
            srv: true,
            resolv_conf: "/etc/resolv.conf".into(),
            dns_timeout: DEFAULT_DNS_TIMEOUT,
            nameserver_override: None,
            kept: None,
        }
    }
}

/// Where a fleet URL came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    ProvisioningFile(PathBuf),
    /// `name` is the SRV name that answered, without the trailing dot.
    DnsSrv {
        name: String,
    },
    Configured,
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::ProvisioningFile(path) => write!(f, "provisioning file {}", path.display()),
            Source::DnsSrv { name } => write!(f, "DNS SRV {name}"),
            Source::Configured => f.write_str("configuration"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Discovered {
    /// An https URL that [`FleetUrl::parse`] accepts.
    pub url: String,
    pub source: Source,
    /// The provisioning file's `site` label, if it gave one.
    pub site: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("could not read provisioning file {} (make it readable by the agent, or remove it)", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {problem}\n  fix: {fix}", origin(path, *line))]
    Provisioning {
        path: PathBuf,
        /// 1-based line the problem is on, when it is on one.
        line: Option<usize>,
        problem: String,
        fix: String,
    },
    #[error("configuration key `fleet.url`: {problem}\n  fix: give the fleet's https URL, e.g. https://fleet.example.com:8443, or \"\" to rely on discovery")]
    Configured { problem: String },
}

fn origin(path: &Path, line: Option<usize>) -> String {
    match line {
        Some(l) => format!("provisioning file {}, line {l}", path.display()),
        None => format!("provisioning file {}", path.display()),
    }
}

/// Finds the fleet: provisioning file, then DNS SRV, then the configured URL. Blocking (the caller runs it on
/// a blocking thread); DNS may take up to two timeouts per name server. `Ok(None)` when nothing names a fleet.
pub fn discover(s: &DiscoverySettings) -> Result<Option<Discovered>, DiscoveryError> {
    for path in &s.provisioning_paths {
        if let Some(found) = read_provisioning(path)? {
            if let Some(kept) = &s.kept {
                keep(path, kept);
            }
            return Ok(Some(found));
        }
    }
    if let Some(kept) = &s.kept {
        // A kept copy that went bad is not worth blocking on: the stick or DNS can name the fleet again.
        match read_provisioning(kept) {
            Ok(Some(found)) => return Ok(Some(found)),
            Ok(None) => {}
            Err(e) => tracing::warn!(
                "ignoring the kept provisioning file: {}",
                crate::error_chain(&e)
            ),
        }
    }
    if s.srv {
        if let Some(found) = discover_srv(s) {
            return Ok(Some(found));
        }
    }
    if s.configured_url.is_empty() {
        return Ok(None);
    }
    FleetUrl::parse(&s.configured_url).map_err(|problem| DiscoveryError::Configured { problem })?;
    Ok(Some(Discovered {
        url: s.configured_url.clone(),
        source: Source::Configured,
        site: None,
    }))
}

// ---------------------------------------------------------------------------------------------------------
// Provisioning file

/// Copies a valid provisioning file to `kept` when it differs, through a temporary file and a rename so a
/// power cut leaves the old copy or the new one. Failure only costs the fallback, so it is logged, not fatal.
fn keep(path: &Path, kept: &Path) {
    let Ok(bytes) = std::fs::read(path) else {
        return;
    };
    if std::fs::read(kept).is_ok_and(|old| old == bytes) {
        return;
    }
    let result = kept
        .parent()
        .map_or(Ok(()), std::fs::create_dir_all)
        .and_then(|()| cairn_proto::atomic_file::write(kept, &bytes, 0o644));
    match result {
        Ok(()) => {
            tracing::info!(from = %path.display(), to = %kept.display(), "provisioning file kept")
        }
        Err(e) => {
            tracing::warn!(from = %path.display(), to = %kept.display(), error = %e, "cannot keep the provisioning file")
        }
    }
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ProvisioningFile {
    /// Optional here so that its absence is reported as such rather than at line 1.
    fleet_url: Option<toml::Spanned<String>>,
    site: Option<toml::Spanned<String>>,
}

/// `Ok(None)` if nothing is at `path`; anything there that is not a valid provisioning file is an error.
fn read_provisioning(path: &Path) -> Result<Option<Discovered>, DiscoveryError> {
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
            ) =>
        {
            return Ok(None)
        }
        Err(source) => {
            return Err(DiscoveryError::Read {
                path: path.to_owned(),
                source,
            })
        }
    };
    let mut bytes = Vec::new();
    file.take(MAX_PROVISIONING_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|source| DiscoveryError::Read {
            path: path.to_owned(),
            source,
        })?;
    let invalid = |line: Option<usize>, problem: String, fix: &str| DiscoveryError::Provisioning {
        path: path.to_owned(),
        line,
        problem,
        fix: fix.to_owned(),
    };
    if bytes.len() as u64 > MAX_PROVISIONING_BYTES {
        return Err(invalid(
            None,
            format!("is larger than {} KiB", MAX_PROVISIONING_BYTES / 1024),
            FIX_PROVISIONING,
        ));
    }
    let text = match String::from_utf8(bytes) {
        Ok(t) => t,
        Err(e) => {
            let line = line_of(e.as_bytes(), e.utf8_error().valid_up_to());
            return Err(invalid(
                Some(line),
                "is not UTF-8 text".into(),
                "save it as plain UTF-8 text",
            ));
        }
    };
    let found = parse_provisioning(path, &text)?;
    tracing::debug!(path = %path.display(), url = %found.url, "fleet named by a provisioning file");
    Ok(Some(found))
}

fn parse_provisioning(path: &Path, text: &str) -> Result<Discovered, DiscoveryError> {
    let invalid = |line: Option<usize>, problem: String, fix: &str| DiscoveryError::Provisioning {
        path: path.to_owned(),
        line,
        problem,
        fix: fix.to_owned(),
    };
    let file: ProvisioningFile = toml::from_str(text).map_err(|e| {
        let line = e.span().map(|s| line_of(text.as_bytes(), s.start));
        invalid(
            line,
            format!("is not valid: {}", e.message().trim_end()),
            FIX_PROVISIONING,
        )
    })?;
    let Some(url) = file.fleet_url else {
        return Err(invalid(None, "has no `fleet_url`".into(), FIX_PROVISIONING));
    };
    let url_line = line_of(text.as_bytes(), url.span().start);
    let url = url.into_inner();
    FleetUrl::parse(&url).map_err(|e| {
        invalid(
            Some(url_line),
            format!("`fleet_url`: {e}"),
            "give the fleet's https URL with a host and optionally a port, e.g. \
             fleet_url = \"https://fleet.example.com:8443\"",
        )
    })?;
    let site = match file.site {
        None => None,
        Some(site) => {
            let line = line_of(text.as_bytes(), site.span().start);
            let site = site.into_inner();
            let site = site.trim();
            if site.chars().any(char::is_control) {
                return Err(invalid(
                    Some(line),
                    "`site` contains control characters".into(),
                    "use a short one-line label, e.g. site = \"berlin-rack-3\"",
                ));
            }
            if site.chars().count() > MAX_SITE_CHARS {
                return Err(invalid(
                    Some(line),
                    format!("`site` is longer than {MAX_SITE_CHARS} characters"),
                    "use a short one-line label, e.g. site = \"berlin-rack-3\"",
                ));
            }
            (!site.is_empty()).then(|| site.to_owned())
        }
    };
    Ok(Discovered {
        url,
        source: Source::ProvisioningFile(path.to_owned()),
        site,
    })
}

/// 1-based line of byte `offset`.
fn line_of(text: &[u8], offset: usize) -> usize {
    text[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

// ---------------------------------------------------------------------------------------------------------
// resolv.conf

/// What discovery needs from resolv.conf.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResolvConf {
    /// At most three, port 53, in file order.
    pub nameservers: Vec<SocketAddr>,
    /// Search domains without trailing dots, at most six.
    pub search: Vec<String>,
}

impl ResolvConf {
    /// As glibc reads it: `#` and `;` start comments, `domain` and `search` replace each other (the last one
    /// wins), other keywords (`options`, `sortlist`, …) are ignored. Entries that are not valid (an address
    /// that does not parse, a domain that is not a host name) are skipped; this never fails.
    pub fn parse(text: &str) -> Self {
        let mut conf = ResolvConf::default();
        for line in text.lines() {
            let line = line.split(['#', ';']).next().unwrap_or("");
            let mut words = line.split_whitespace();
            match words.next() {
                Some("nameserver") => {
                    let Some(addr) = words.next() else { continue };
                    match parse_nameserver(addr) {
                        Some(a) if conf.nameservers.len() < MAX_NAMESERVERS => {
                            conf.nameservers.push(a)
                        }
                        Some(_) => {}
                        None => {
                            tracing::debug!(nameserver = addr, "resolv.conf name server skipped")
                        }
                    }
                }
                Some("domain") => conf.search = words.take(1).filter_map(search_domain).collect(),
                Some("search") => conf.search = words.filter_map(search_domain).collect(),
                _ => {}
            }
        }
        let mut unique: Vec<String> = Vec::new();
        for domain in conf.search.drain(..) {
            if !unique.iter().any(|u| u.eq_ignore_ascii_case(&domain)) {
                unique.push(domain);
            }
        }
        unique.truncate(MAX_SEARCH_DOMAINS);
        conf.search = unique;
        conf
    }
}

fn parse_nameserver(addr: &str) -> Option<SocketAddr> {
    if let Ok(ip) = addr.parse::<std::net::IpAddr>() {
        return Some(SocketAddr::new(ip, 53));
    }
    // Link-local IPv6 with a zone: only numeric zones; names would need if_nametoindex.
    let (ip, zone) = addr.split_once('%')?;
    let ip: Ipv6Addr = ip.parse().ok()?;
    let scope: u32 = zone.parse().ok()?;
    Some(SocketAddr::V6(SocketAddrV6::new(ip, 53, 0, scope)))
}

fn search_domain(word: &str) -> Option<String> {
    let domain = word.strip_suffix('.').unwrap_or(word);
    // The SRV name must still fit in 253 characters.
    (is_host_name(domain) && domain.len() + SRV_PREFIX.len() < 253).then(|| domain.to_owned())
}

/// Letters, digits, `-` and `_` in labels of 1 to 63 characters, 253 characters in all.
fn is_host_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

// ---------------------------------------------------------------------------------------------------------
// DNS SRV

fn discover_srv(s: &DiscoverySettings) -> Option<Discovered> {
    let text = match std::fs::read_to_string(&s.resolv_conf) {
        Ok(t) => t,
        Err(e) => {
            tracing::info!(path = %s.resolv_conf.display(), error = %e, "no resolv.conf; skipping DNS SRV fleet discovery");
            return None;
        }
    };
    let conf = ResolvConf::parse(&text);
    if conf.search.is_empty() {
        tracing::info!(path = %s.resolv_conf.display(), "no search domain in resolv.conf; skipping DNS SRV fleet discovery");
        return None;
    }
    let servers = match (s.nameserver_override, conf.nameservers.is_empty()) {
        (Some(addr), _) => vec![addr],
        // As glibc: no name server line means the local one.
        (None, true) => vec![SocketAddr::from((Ipv4Addr::LOCALHOST, 53))],
        (None, false) => conf.nameservers,
    };
    // A server that timed out is not asked again in this run, so one discovery takes at most two timeouts per
    // server however many search domains there are.
    let mut alive = vec![true; servers.len()];
    for domain in &conf.search {
        let name = format!("{SRV_PREFIX}.{domain}");
        let mut answer = None;
        for (server, up) in servers.iter().zip(alive.iter_mut()) {
            if !*up {
                continue;
            }
            match query_srv(*server, &name, s.dns_timeout) {
                Outcome::Answer(records) => {
                    answer = Some(records);
                    break;
                }
                Outcome::Failed => {}
                Outcome::TimedOut => *up = false,
            }
        }
        let Some(records) = answer else { continue };
        let usable: Vec<Srv> = records
            .into_iter()
            .filter(|r| match srv_url(r) {
                Ok(_) => true,
                Err(why) => {
                    tracing::info!(name = %name, target = %r.target, port = r.port, why, "SRV record skipped");
                    false
                }
            })
            .collect();
        if let Some(url) = choose(&usable, random_u32()).and_then(|r| srv_url(r).ok()) {
            tracing::debug!(name = %name, url = %url, "fleet named by DNS SRV");
            return Some(Discovered {
                url,
                source: Source::DnsSrv { name },
                site: None,
            });
        }
        tracing::debug!(name = %name, "no usable SRV record");
    }
    tracing::info!(
        domains = ?conf.search,
        "no {SRV_PREFIX} SRV record in any search domain"
    );
    None
}

/// One SRV record; `target` is a validated host name, or "." for "service not available here".
#[derive(Debug, Clone, PartialEq, Eq)]
struct Srv {
    priority: u16,
    weight: u16,
    port: u16,
    target: String,
}

fn srv_url(r: &Srv) -> Result<String, &'static str> {
    if r.target == "." {
        return Err("target \".\" means the service is not offered in this domain");
    }
    if r.port == 0 {
        return Err("port 0");
    }
    let url = format!("https://{}:{}", r.target, r.port);
    FleetUrl::parse(&url).map_err(|_| "target is not a usable host")?;
    Ok(url)
}

/// RFC 2782: the lowest priority, then a weighted random pick among equal priorities (zero weights first, so
/// they are chosen only when `random` lands on 0, or uniformly when every weight is zero).
fn choose(records: &[Srv], random: u32) -> Option<&Srv> {
    let best = records.iter().map(|r| r.priority).min()?;
    let mut group: Vec<&Srv> = records.iter().filter(|r| r.priority == best).collect();
    group.sort_by_key(|r| r.weight != 0);
    let total: u64 = group.iter().map(|r| u64::from(r.weight)).sum();
    if total == 0 {
        return group.get(random as usize % group.len()).copied();
    }
    let pick = u64::from(random) % (total + 1);
    let mut running = 0;
    for r in &group {
        running += u64::from(r.weight);
        if running >= pick {
            return Some(r);
        }
    }
    group.last().copied()
}

enum Outcome {
    /// The server answered this name: the records (none for NXDOMAIN or no data).
    Answer(Vec<Srv>),
    /// This server cannot answer this name (error code, truncated, malformed, unreachable): try the next.
    Failed,
    /// Nothing came back, twice.
    TimedOut,
}

fn query_srv(server: SocketAddr, name: &str, timeout: Duration) -> Outcome {
    let id = random_u32() as u16;
    let Some(packet) = encode_query(id, name) else {
        return Outcome::Failed;
    };
    let local: SocketAddr = if server.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    // Connected: the kernel drops datagrams from anyone but the server, and reports ICMP refusals.
    let socket = match UdpSocket::bind(local).and_then(|s| s.connect(server).map(|()| s)) {
        Ok(s) => s,
        Err(e) => {
            tracing::info!(%server, error = %e, "cannot reach DNS server");
            return Outcome::Failed;
        }
    };
    let mut buf = vec![0u8; 65535];
    for attempt in 1..=2 {
        if let Err(e) = socket.send(&packet) {
            tracing::info!(%server, error = %e, "cannot send to DNS server");
            return Outcome::Failed;
        }
        let deadline = Instant::now() + timeout;
        while let Some(left) = deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
        {
            if let Err(e) = socket.set_read_timeout(Some(left)) {
                tracing::info!(%server, error = %e, "cannot wait for DNS server");
                return Outcome::Failed;
            }
            let n = match socket.recv(&mut buf) {
                Ok(n) => n,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    break
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::info!(%server, name, error = %e, "DNS query failed");
                    return Outcome::Failed;
                }
            };
            match parse_reply(&buf[..n], id, name) {
                Reply::Ignore(why) => {
                    // Late, stray or forged: keep waiting for the real answer.
                    tracing::debug!(%server, name, why, "DNS datagram ignored");
                }
                Reply::Malformed(why) => {
                    tracing::info!(%server, name, why, "DNS answer is malformed");
                    return Outcome::Failed;
                }
                Reply::Truncated => {
                    tracing::info!(%server, name, "DNS answer truncated (TC); the agent does not retry over TCP");
                    return Outcome::Failed;
                }
                Reply::Rcode(rcode) => {
                    tracing::info!(%server, name, rcode, "DNS server answered with an error");
                    return Outcome::Failed;
                }
                Reply::NxDomain => {
                    tracing::debug!(%server, name, "NXDOMAIN");
                    return Outcome::Answer(Vec::new());
                }
                Reply::Records(records) => {
                    tracing::debug!(%server, name, count = records.len(), "SRV answer");
                    return Outcome::Answer(records);
                }
            }
        }
        tracing::debug!(%server, name, attempt, "no DNS answer in time");
    }
    tracing::info!(%server, name, timeout_ms = timeout.as_millis() as u64, "DNS server did not answer, twice");
    Outcome::TimedOut
}

/// A standard query, recursion desired, for `name IN SRV`. `None` if `name` cannot be encoded.
fn encode_query(id: u16, name: &str) -> Option<Vec<u8>> {
    let mut q = Vec::with_capacity(18 + name.len());
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00]); // RD
    q.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]); // QDCOUNT 1
    for label in name.trim_end_matches('.').split('.') {
        if label.is_empty() || label.len() > 63 {
            return None;
        }
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.push(0);
    if q.len() - 12 > 255 {
        return None;
    }
    q.extend_from_slice(&TYPE_SRV.to_be_bytes());
    q.extend_from_slice(&CLASS_IN.to_be_bytes());
    Some(q)
}

#[derive(Debug, PartialEq, Eq)]
enum Reply {
    /// Not an answer to our query.
    Ignore(&'static str),
    Malformed(&'static str),
    Truncated,
    Rcode(u8),
    NxDomain,
    /// NOERROR: the SRV records for the name (possibly none).
    Records(Vec<Srv>),
}

fn parse_reply(msg: &[u8], id: u16, qname: &str) -> Reply {
    let mut r = Reader { msg, pos: 0 };
    let (Some(got_id), Some(flags), Some(qd), Some(an)) = (r.u16(), r.u16(), r.u16(), r.u16())
    else {
        return Reply::Ignore("shorter than a DNS header");
    };
    if got_id != id {
        return Reply::Ignore("wrong id");
    }
    if flags & 0x8000 == 0 {
        return Reply::Ignore("not a response");
    }
    let (Some(_ns), Some(_ar)) = (r.u16(), r.u16()) else {
        return Reply::Malformed("header cut short");
    };
    let rcode = (flags & 0x000f) as u8;
    if qd != 1 {
        // Some servers drop the question from error answers; an answer with data must echo it.
        return match rcode {
            0 => Reply::Malformed("no question section"),
            RCODE_NXDOMAIN => Reply::NxDomain,
            other => Reply::Rcode(other),
        };
    }
    let Some(name) = r.name() else {
        return Reply::Malformed("question name");
    };
    let (Some(qtype), Some(qclass)) = (r.u16(), r.u16()) else {
        return Reply::Malformed("question cut short");
    };
    if !name_is(&name, qname) || qtype != TYPE_SRV || qclass != CLASS_IN {
        return Reply::Ignore("answers another question");
    }
    if flags & 0x0200 != 0 {
        return Reply::Truncated;
    }
    match rcode {
        0 => {}
        RCODE_NXDOMAIN => return Reply::NxDomain,
        other => return Reply::Rcode(other),
    }
    let mut srvs: Vec<(Labels, Srv)> = Vec::new();
    let mut cnames: Vec<(Labels, Labels)> = Vec::new();
    for _ in 0..an {
        let Some(owner) = r.name() else {
            return Reply::Malformed("answer name");
        };
        let (Some(rtype), Some(rclass), Some(_ttl), Some(rdlen)) =
            (r.u16(), r.u16(), r.u32(), r.u16())
        else {
            return Reply::Malformed("answer cut short");
        };
        let start = r.pos;
        let end = start + usize::from(rdlen);
        if end > msg.len() {
            return Reply::Malformed("answer data cut short");
        }
        match (rtype, rclass) {
            (TYPE_SRV, CLASS_IN) => {
                let mut d = Reader { msg, pos: start };
                let (Some(priority), Some(weight), Some(port), Some(target)) =
                    (d.u16(), d.u16(), d.u16(), d.name())
                else {
                    return Reply::Malformed("SRV data");
                };
                if d.pos != end {
                    return Reply::Malformed("SRV data length");
                }
                match host_name(&target) {
                    Some(target) => srvs.push((
                        owner,
                        Srv {
                            priority,
                            weight,
                            port,
                            target,
                        },
                    )),
                    None => {
                        tracing::debug!("SRV record with a target that is not a host name skipped")
                    }
                }
            }
            (TYPE_CNAME, CLASS_IN) => {
                let mut d = Reader { msg, pos: start };
                let Some(target) = d.name() else {
                    return Reply::Malformed("CNAME data");
                };
                if d.pos != end {
                    return Reply::Malformed("CNAME data length");
                }
                cnames.push((owner, target));
            }
            _ => {}
        }
        r.pos = end;
    }
    // Only records for the name asked, or for where its CNAME chain (within this answer) leads.
    let mut current: Labels = qname
        .trim_end_matches('.')
        .split('.')
        .map(|l| l.as_bytes().to_vec())
        .collect();
    for _ in 0..MAX_CNAME_HOPS {
        match cnames.iter().find(|(owner, _)| same_name(owner, &current)) {
            Some((_, target)) => current = target.clone(),
            None => break,
        }
    }
    Reply::Records(
        srvs.into_iter()
            .filter(|(owner, _)| same_name(owner, &current))
            .map(|(_, srv)| srv)
            .collect(),
    )
}

fn same_name(a: &[Vec<u8>], b: &[Vec<u8>]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.eq_ignore_ascii_case(y))
}

fn name_is(labels: &[Vec<u8>], name: &str) -> bool {
    let mut parts = name.trim_end_matches('.').split('.');
    labels.iter().all(|l| {
        parts
            .next()
            .is_some_and(|p| p.as_bytes().eq_ignore_ascii_case(l))
    }) && parts.next().is_none()
}

/// Labels as a host name; the root as "."; `None` if a label holds anything a host name may not.
fn host_name(labels: &[Vec<u8>]) -> Option<String> {
    if labels.is_empty() {
        return Some(".".into());
    }
    let mut out = String::new();
    for label in labels {
        if !out.is_empty() {
            out.push('.');
        }
        out.push_str(std::str::from_utf8(label).ok()?);
    }
    is_host_name(&out).then_some(out)
}

/// A domain name as its labels, root last and implied.
type Labels = Vec<Vec<u8>>;

/// Bounds-checked reads from a DNS message.
struct Reader<'a> {
    msg: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn bytes<const N: usize>(&mut self) -> Option<[u8; N]> {
        let b = self.msg.get(self.pos..self.pos.checked_add(N)?)?;
        self.pos += N;
        b.try_into().ok()
    }

    fn u16(&mut self) -> Option<u16> {
        self.bytes().map(u16::from_be_bytes)
    }

    fn u32(&mut self) -> Option<u32> {
        self.bytes().map(u32::from_be_bytes)
    }

    /// A possibly compressed name, as labels (empty for the root); `pos` moves past it. A pointer must point
    /// before the start of the stretch of labels it ends, so pointers cannot loop; the hop and length limits
    /// are a second guard.
    fn name(&mut self) -> Option<Labels> {
        let mut labels = Vec::new();
        let mut pos = self.pos;
        let mut segment_start = pos;
        let mut after: Option<usize> = None;
        let mut wire_len = 1usize;
        let mut hops = 0;
        loop {
            let len = *self.msg.get(pos)?;
            match len & 0xc0 {
                0x00 if len == 0 => {
                    self.pos = after.unwrap_or(pos + 1);
                    return Some(labels);
                }
                0x00 => {
                    let len = usize::from(len);
                    let label = self.msg.get(pos + 1..pos + 1 + len)?;
                    wire_len += len + 1;
                    if wire_len > 255 {
                        return None;
                    }
                    labels.push(label.to_vec());
                    pos += len + 1;
                }
                0xc0 => {
                    let low = *self.msg.get(pos + 1)?;
                    let target = (usize::from(len & 0x3f) << 8) | usize::from(low);
                    hops += 1;
                    if target >= segment_start || hops > MAX_POINTER_HOPS {
                        return None;
                    }
                    after.get_or_insert(pos + 2);
                    pos = target;
                    segment_start = target;
                }
                // 0x40 and 0x80: extended and reserved label types.
                _ => return None,
            }
        }
    }
}

/// Random bits for query ids and the weighted pick: /dev/urandom, or std's randomly keyed hasher if that is
/// unavailable (never a panic; unpredictable either way).
fn random_u32() -> u32 {
    let mut b = [0u8; 4];
    match std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b)) {
        Ok(()) => u32::from_ne_bytes(b),
        Err(_) => {
            use std::hash::{BuildHasher, Hasher};
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u128(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos())
                    .unwrap_or(0),
            );
            h.finish() as u32
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NAME: &str = "_cairn-enroll._tcp.example.net";

    /// A reply to `encode_query(id, NAME)`; answers are (owner, type, rdata) with owner already encoded.
    fn reply(id: u16, flags: u16, answers: &[(Vec<u8>, u16, Vec<u8>)]) -> Vec<u8> {
        let mut m = encode_query(id, NAME).unwrap();
        m[2..4].copy_from_slice(&flags.to_be_bytes());
        m[6..8].copy_from_slice(&(answers.len() as u16).to_be_bytes());
        for (owner, rtype, rdata) in answers {
            m.extend_from_slice(owner);
            m.extend_from_slice(&rtype.to_be_bytes());
            m.extend_from_slice(&CLASS_IN.to_be_bytes());
            m.extend_from_slice(&300u32.to_be_bytes());
            m.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
            m.extend_from_slice(rdata);
        }
        m
    }

    fn labels(name: &str) -> Vec<u8> {
        let mut out = Vec::new();
        for l in name.split('.').filter(|l| !l.is_empty()) {
            out.push(l.len() as u8);
            out.extend_from_slice(l.as_bytes());
        }
        out.push(0);
        out
    }

    /// Pointer to the question name (offset 12), and to "example.net" within it.
    const PTR_QNAME: [u8; 2] = [0xc0, 12];
    const PTR_DOMAIN: [u8; 2] = [0xc0, 12 + 14 + 5];

    fn srv_rdata(priority: u16, weight: u16, port: u16, target: &[u8]) -> Vec<u8> {
        let mut d = Vec::new();
        d.extend_from_slice(&priority.to_be_bytes());
        d.extend_from_slice(&weight.to_be_bytes());
        d.extend_from_slice(&port.to_be_bytes());
        d.extend_from_slice(target);
        d
    }

    fn srv(priority: u16, weight: u16, port: u16, target: &str) -> Srv {
        Srv {
            priority,
            weight,
            port,
            target: target.into(),
        }
    }

    #[test]
    fn query_layout() {
        let q = encode_query(0xbeef, NAME).unwrap();
        assert_eq!(&q[..12], &[0xbe, 0xef, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&q[12..q.len() - 4], labels(NAME).as_slice());
        assert_eq!(&q[q.len() - 4..], &[0, 33, 0, 1]);
        assert!(encode_query(1, "a..b").is_none());
        assert!(encode_query(1, &"a".repeat(64)).is_none());
        assert!(encode_query(1, &["abcdefghi"; 30].join(".")).is_none());
    }

    #[test]
    fn compressed_answer_parses() {
        let mut target = vec![5];
        target.extend_from_slice(b"fleet");
        target.extend_from_slice(&PTR_DOMAIN);
        let m = reply(
            7,
            0x8180,
            &[(
                PTR_QNAME.to_vec(),
                TYPE_SRV,
                srv_rdata(10, 5, 8443, &target),
            )],
        );
        assert_eq!(
            parse_reply(&m, 7, NAME),
            Reply::Records(vec![srv(10, 5, 8443, "fleet.example.net")])
        );
        assert_eq!(
            parse_reply(&m, 7, "_cairn-enroll._tcp.EXAMPLE.net."),
            Reply::Records(vec![srv(10, 5, 8443, "fleet.example.net")]),
            "names compare without case"
        );
    }

    #[test]
    fn cname_chain_is_followed_and_unrelated_owners_ignored() {
        let alias = labels("real.example.org");
        let answers = [
            (PTR_QNAME.to_vec(), TYPE_CNAME, alias.clone()),
            (
                alias.clone(),
                TYPE_SRV,
                srv_rdata(1, 0, 443, &labels("a.example.org")),
            ),
            (
                labels("other.example.org"),
                TYPE_SRV,
                srv_rdata(0, 0, 443, &labels("evil.example.org")),
            ),
        ];
        assert_eq!(
            parse_reply(&reply(7, 0x8180, &answers), 7, NAME),
            Reply::Records(vec![srv(1, 0, 443, "a.example.org")])
        );
    }

    #[test]
    fn header_checks() {
        let ok = reply(7, 0x8180, &[]);
        assert_eq!(parse_reply(&ok, 7, NAME), Reply::Records(vec![]));
        assert_eq!(parse_reply(&ok, 8, NAME), Reply::Ignore("wrong id"));
        assert_eq!(
            parse_reply(&reply(7, 0x0100, &[]), 7, NAME),
            Reply::Ignore("not a response")
        );
        assert_eq!(
            parse_reply(&reply(7, 0x8183, &[]), 7, NAME),
            Reply::NxDomain
        );
        assert_eq!(
            parse_reply(&reply(7, 0x8182, &[]), 7, NAME),
            Reply::Rcode(2)
        );
        assert_eq!(
            parse_reply(&reply(7, 0x8380, &[]), 7, NAME),
            Reply::Truncated
        );
        assert_eq!(
            parse_reply(&ok, 7, "_cairn-enroll._tcp.example.org"),
            Reply::Ignore("answers another question")
        );
        let mut no_question = reply(7, 0x8185, &[]);
        no_question[5] = 0;
        assert_eq!(parse_reply(&no_question[..12], 7, NAME), Reply::Rcode(5));
    }

    #[test]
    fn every_truncation_of_an_answer_is_rejected_without_panic() {
        let m = reply(
            7,
            0x8180,
            &[(
                PTR_QNAME.to_vec(),
                TYPE_SRV,
                srv_rdata(10, 5, 8443, &labels("fleet.example.net")),
            )],
        );
        for cut in 0..m.len() {
            assert!(
                !matches!(parse_reply(&m[..cut], 7, NAME), Reply::Records(_)),
                "a message cut at {cut} bytes gave records"
            );
        }
    }

    #[test]
    fn pointer_loops_and_forward_pointers_are_rejected() {
        // Points at itself.
        let self_loop = reply(7, 0x8180, &[(vec![0xc0, 0], TYPE_SRV, vec![])]);
        let at = self_loop.len() - 12;
        let mut m = self_loop;
        m[at] = 0xc0;
        m[at + 1] = at as u8;
        assert_eq!(parse_reply(&m, 7, NAME), Reply::Malformed("answer name"));

        // A label followed by a pointer back to that label.
        let answers = [(vec![1, b'a', 0xc0, 0], TYPE_SRV, vec![])];
        let mut m = reply(7, 0x8180, &answers);
        let at = m.len() - 10 - 4;
        m[at + 3] = at as u8;
        assert_eq!(parse_reply(&m, 7, NAME), Reply::Malformed("answer name"));

        // Two pointers at each other, and a pointer past the end.
        let mut r = Reader {
            msg: &[0xc0, 2, 0xc0, 0],
            pos: 2,
        };
        assert!(r.name().is_none());
        let mut r = Reader {
            msg: &[0xc0, 9],
            pos: 0,
        };
        assert!(r.name().is_none());
        // Reserved label types.
        let mut r = Reader {
            msg: &[0x40, 0],
            pos: 0,
        };
        assert!(r.name().is_none());
    }

    #[test]
    fn names_longer_than_255_are_rejected() {
        let mut msg = Vec::new();
        for _ in 0..5 {
            msg.push(63);
            msg.extend_from_slice(&[b'a'; 63]);
        }
        msg.push(0);
        assert!(Reader { msg: &msg, pos: 0 }.name().is_none());
    }

    #[test]
    fn srv_targets_must_be_host_names() {
        let answers = [
            (
                PTR_QNAME.to_vec(),
                TYPE_SRV,
                srv_rdata(1, 0, 443, &labels("a@evil.example")),
            ),
            (PTR_QNAME.to_vec(), TYPE_SRV, srv_rdata(2, 0, 443, &[0])),
        ];
        assert_eq!(
            parse_reply(&reply(7, 0x8180, &answers), 7, NAME),
            Reply::Records(vec![srv(2, 0, 443, ".")])
        );
        assert!(srv_url(&srv(2, 0, 443, ".")).is_err());
        assert!(srv_url(&srv(2, 0, 0, "fleet.example")).is_err());
        assert_eq!(
            srv_url(&srv(2, 0, 8443, "fleet.example")).unwrap(),
            "https://fleet.example:8443"
        );
    }

    #[test]
    fn srv_data_with_wrong_length_is_malformed() {
        let mut rdata = srv_rdata(1, 0, 443, &labels("fleet.example"));
        rdata.push(0);
        let m = reply(7, 0x8180, &[(PTR_QNAME.to_vec(), TYPE_SRV, rdata)]);
        assert_eq!(
            parse_reply(&m, 7, NAME),
            Reply::Malformed("SRV data length")
        );
    }

    #[test]
    fn choose_follows_rfc_2782() {
        assert!(choose(&[], 0).is_none());
        let records = [
            srv(20, 100, 1, "a"),
            srv(10, 0, 2, "b"),
            srv(10, 3, 3, "c"),
            srv(10, 1, 4, "d"),
        ];
        // Lowest priority group b(0), c(3), d(1), zero weight first: running sums 0, 3, 4 over 0..=4.
        assert_eq!(choose(&records, 0).unwrap().target, "b");
        for r in 1..=3 {
            assert_eq!(choose(&records, r).unwrap().target, "c");
        }
        assert_eq!(choose(&records, 4).unwrap().target, "d");
        assert_eq!(
            choose(&records, 5).unwrap().target,
            "b",
            "wraps modulo total + 1"
        );
        let zeros = [srv(1, 0, 1, "x"), srv(1, 0, 2, "y")];
        assert_eq!(choose(&zeros, 0).unwrap().target, "x");
        assert_eq!(choose(&zeros, 1).unwrap().target, "y");
    }

    #[test]
    fn resolv_conf_as_glibc_reads_it() {
        let conf = ResolvConf::parse(
            "# generated by DHCP\n\
             nameserver 192.0.2.1 # primary\n\
             nameserver 2001:db8::53\n\
             ; nameserver 192.0.2.99\n\
             nameserver fe80::1%2\n\
             nameserver 192.0.2.4\n\
             options edns0 timeout:1\n\
             domain ignored.example\n\
             search site.example. corp.example site.example\n\
             sortlist 130.155.160.0/255.255.240.0\n",
        );
        assert_eq!(
            conf.nameservers,
            vec![
                "192.0.2.1:53".parse::<SocketAddr>().unwrap(),
                "[2001:db8::53]:53".parse().unwrap(),
                SocketAddr::V6(SocketAddrV6::new("fe80::1".parse().unwrap(), 53, 0, 2)),
            ],
            "at most three"
        );
        assert_eq!(
            conf.search,
            vec!["site.example", "corp.example"],
            "the last of domain/search wins, deduplicated"
        );

        let conf = ResolvConf::parse("search a.example b.example\ndomain lan.example\nnameserver bogus\nnameserver fe80::1%eth0\n");
        assert_eq!(conf.search, vec!["lan.example"]);
        assert!(conf.nameservers.is_empty());

        let conf = ResolvConf::parse("search . bad/name ok.example\n");
        assert_eq!(conf.search, vec!["ok.example"]);
        assert_eq!(ResolvConf::parse(""), ResolvConf::default());
        let many = ResolvConf::parse("search a b c d e f g h\n");
        assert_eq!(many.search.len(), MAX_SEARCH_DOMAINS);
    }

    fn provisioning_error(text: &str) -> (Option<usize>, String) {
        match parse_provisioning(Path::new("/boot/cairn-provision.toml"), text) {
            Err(e @ DiscoveryError::Provisioning { line, .. }) => (line, e.to_string()),
            other => panic!("expected a provisioning error, got {other:?}"),
        }
    }

    #[test]
    fn provisioning_file_errors_name_file_line_and_fix() {
        let (line, msg) =
            provisioning_error("# stick\nfleet_url = \"https://f.example\"\nsiet = \"x\"\n");
        assert_eq!(line, Some(3));
        assert!(
            msg.starts_with("provisioning file /boot/cairn-provision.toml, line 3: "),
            "{msg}"
        );
        assert!(msg.contains("siet") && msg.contains("fix: "), "{msg}");

        let (line, msg) = provisioning_error("\n\nfleet_url = \"https://unterminated\n");
        assert_eq!(line, Some(3), "{msg}");

        let (line, msg) = provisioning_error("site = \"x\"\n");
        assert_eq!(line, None);
        assert!(msg.contains("has no `fleet_url`"), "{msg}");

        let (line, msg) = provisioning_error("site = \"x\"\nfleet_url = \"http://f.example\"\n");
        assert_eq!(line, Some(2));
        assert!(msg.contains("https"), "{msg}");

        let (line, _) = provisioning_error("fleet_url = \"https://f.example\"\nsite = \"a\\nb\"\n");
        assert_eq!(line, Some(2));
        let (_, msg) = provisioning_error(&format!(
            "fleet_url = \"https://f.example\"\nsite = \"{}\"\n",
            "x".repeat(129)
        ));
        assert!(msg.contains("longer"), "{msg}");
    }

    #[test]
    fn provisioning_file_site_is_optional_and_trimmed() {
        let path = Path::new("/p.toml");
        let d = parse_provisioning(
            path,
            "fleet_url = \"https://f.example:8443\"\nsite = \" rack 3 \"\n",
        )
        .unwrap();
        assert_eq!(d.url, "https://f.example:8443");
        assert_eq!(d.site.as_deref(), Some("rack 3"));
        assert_eq!(d.source, Source::ProvisioningFile(path.into()));
        let d =
            parse_provisioning(path, "fleet_url = \"https://f.example\"\nsite = \"\"\n").unwrap();
        assert_eq!(d.site, None);
    }

    #[test]
    fn source_display() {
        assert_eq!(
            Source::ProvisioningFile("/boot/cairn-provision.toml".into()).to_string(),
            "provisioning file /boot/cairn-provision.toml"
        );
        assert_eq!(
            Source::DnsSrv { name: NAME.into() }.to_string(),
            "DNS SRV _cairn-enroll._tcp.example.net"
        );
        assert_eq!(Source::Configured.to_string(), "configuration");
    }

    #[test]
    fn line_of_counts_from_one() {
        assert_eq!(line_of(b"a\nb\nc", 0), 1);
        assert_eq!(line_of(b"a\nb\nc", 2), 2);
        assert_eq!(line_of(b"a\nb\nc", 99), 3);
    }
}
