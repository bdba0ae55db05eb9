//! The UPS, through a Network UPS Tools server (`upsd`, TCP port 3493): a small client for its line protocol
//! (NUT developer guide, "Network protocol information"). One exchange per poll:
//!
//! ```text
//! → LIST VAR <ups>
//! ← BEGIN LIST VAR <ups>
//! ← VAR <ups> <name> "<value>"       (values quoted, `\"` and `\\` escaped)
//! ← END LIST VAR <ups>
//! ```
//!
//! or `ERR <code> [...]`. The whole exchange is bounded in time, line length, line count and bytes; anything
//! that is not the protocol is an error naming the server, never a panic. Series are nut_exporter's
//! (DRuggeri/nut_exporter, default namespace `network_ups_tools`).

use super::PowerError;
use crate::telemetry::Sample;
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

pub const DEFAULT_PORT: u16 = 3493;
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);
/// Longer lines are not upsd's (its own buffers are smaller).
const MAX_LINE: usize = 4096;
/// A UPS has a few dozen to a few hundred variables.
const MAX_VARS: usize = 2048;
const MAX_BYTES: usize = 1 << 20;

/// The flags nut_exporter always publishes, 0 when absent (its `--nut.statuses` default).
const DEFAULT_STATUSES: [&str; 15] = [
    "OL", "OB", "LB", "HB", "RB", "CHRG", "DISCHRG", "BYPASS", "CAL", "OFF", "OVER", "TRIM",
    "BOOST", "FSD", "SD",
];

/// nut_exporter's device_info labels, from the `device.*` variables.
const DEVICE_LABELS: [&str; 9] = [
    "model",
    "mfr",
    "serial",
    "type",
    "description",
    "contact",
    "location",
    "part",
    "macaddr",
];

/// The numeric variables published, with nut_exporter's name (`.` and `-` to `_`, namespace prefixed).
const VARIABLES: [(&str, &str, &str); 16] = [
    (
        "battery.charge",
        "network_ups_tools_battery_charge",
        "Battery charge, percent (battery.charge)",
    ),
    (
        "battery.charge.low",
        "network_ups_tools_battery_charge_low",
        "Remaining battery level when the UPS switches to low battery, percent (battery.charge.low)",
    ),
    (
        "battery.runtime",
        "network_ups_tools_battery_runtime",
        "Battery runtime, seconds (battery.runtime)",
    ),
    (
        "battery.runtime.low",
        "network_ups_tools_battery_runtime_low",
        "Remaining battery runtime when the UPS switches to low battery, seconds (battery.runtime.low)",
    ),
    (
        "battery.voltage",
        "network_ups_tools_battery_voltage",
        "Battery voltage, V (battery.voltage)",
    ),
    (
        "battery.voltage.nominal",
        "network_ups_tools_battery_voltage_nominal",
        "Nominal battery voltage, V (battery.voltage.nominal)",
    ),
    (
        "input.voltage",
        "network_ups_tools_input_voltage",
        "Input voltage, V (input.voltage)",
    ),
    (
        "input.voltage.nominal",
        "network_ups_tools_input_voltage_nominal",
        "Nominal input voltage, V (input.voltage.nominal)",
    ),
    (
        "input.frequency",
        "network_ups_tools_input_frequency",
        "Input line frequency, Hz (input.frequency)",
    ),
    (
        "output.voltage",
        "network_ups_tools_output_voltage",
        "Output voltage, V (output.voltage)",
    ),
    (
        "ups.load",
        "network_ups_tools_ups_load",
        "Load on the UPS, percent of full (ups.load)",
    ),
    (
        "ups.power",
        "network_ups_tools_ups_power",
        "Current apparent power, VA (ups.power)",
    ),
    (
        "ups.power.nominal",
        "network_ups_tools_ups_power_nominal",
        "Nominal apparent power, VA (ups.power.nominal)",
    ),
    (
        "ups.realpower",
        "network_ups_tools_ups_realpower",
        "Current real power, W (ups.realpower)",
    ),
    (
        "ups.realpower.nominal",
        "network_ups_tools_ups_realpower_nominal",
        "Nominal real power, W (ups.realpower.nominal)",
    ),
    (
        "ups.temperature",
        "network_ups_tools_ups_temperature",
        "UPS temperature, degrees C (ups.temperature)",
    ),
];

/// Where the UPS is: a NUT server and the UPS's name on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpsConfig {
    /// `host:port`, `host` (port 3493), `[v6]:port` or a bare IPv6 address.
    pub server: String,
    /// The UPS's name on that server, as `upsc -l <server>` lists it.
    pub ups: String,
    /// Bound on the whole exchange, connecting included.
    pub timeout: Duration,
}

impl UpsConfig {
    pub fn new(server: impl Into<String>, ups: impl Into<String>) -> Self {
        UpsConfig {
            server: server.into(),
            ups: ups.into(),
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// Checks what can be checked without the network.
    pub fn validate(&self) -> Result<(), PowerError> {
        let bad = |problem: String| Err(PowerError::UpsConfig { problem });
        if self.server.trim().is_empty() {
            return bad("the NUT server address is empty: set it to host:port of upsd".into());
        }
        if self.ups.is_empty()
            || self.ups.len() > 128
            || !self
                .ups
                .bytes()
                .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\')
        {
            return bad(format!(
                "{:?} is not a NUT UPS name: use the name `upsc -l {}` lists (letters, digits, - _ .)",
                self.ups, self.server
            ));
        }
        if self.timeout.is_zero() {
            return bad("the NUT timeout is zero: give it at least a second".into());
        }
        Ok(())
    }

    /// The host and port to connect to.
    fn host_port(&self) -> (String, u16) {
        let s = self.server.trim();
        if let Ok(a) = s.parse::<SocketAddr>() {
            return (a.ip().to_string(), a.port());
        }
        if let Ok(ip) = s.parse::<IpAddr>() {
            return (ip.to_string(), DEFAULT_PORT);
        }
        if let Some((host, port)) = s.rsplit_once(':') {
            if let Ok(port) = port.parse::<u16>() {
                return (host.to_owned(), port);
            }
        }
        (s.to_owned(), DEFAULT_PORT)
    }
}

/// What the UPS says about itself.
#[derive(Debug, Clone, PartialEq)]
pub struct UpsStatus {
    pub ups: String,
    /// `ups.status`, split: `OL`, `OB` (on battery), `LB` (low battery), `RB` (replace battery), `CHRG`, …
    pub flags: Vec<String>,
    pub battery_charge_percent: Option<f64>,
    pub battery_runtime_secs: Option<f64>,
    pub load_percent: Option<f64>,
    /// Every variable, as the server sent it.
    pub vars: BTreeMap<String, String>,
}

impl UpsStatus {
    pub fn from_vars(ups: &str, vars: BTreeMap<String, String>) -> Self {
        let num = |k: &str| vars.get(k).and_then(|v| parse_number(v));
        UpsStatus {
            ups: ups.to_owned(),
            flags: vars
                .get("ups.status")
                .map(|s| s.split_whitespace().map(str::to_owned).collect())
                .unwrap_or_default(),
            battery_charge_percent: num("battery.charge"),
            battery_runtime_secs: num("battery.runtime"),
            load_percent: num("ups.load"),
            vars,
        }
    }

    pub fn has_flag(&self, flag: &str) -> bool {
        self.flags.iter().any(|f| f == flag)
    }

    pub fn on_battery(&self) -> bool {
        self.has_flag("OB")
    }

    pub fn low_battery(&self) -> bool {
        self.has_flag("LB")
    }
}

/// A finite decimal number; NUT sends numbers as quoted strings.
fn parse_number(v: &str) -> Option<f64> {
    v.trim().parse::<f64>().ok().filter(|x| x.is_finite())
}

/// Splits a protocol line into words: blanks separate, `"…"` quotes, `\` escapes the next character.
fn tokenize(line: &str) -> Result<Vec<String>, &'static str> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut quoted = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                let Some(next) = chars.next() else {
                    return Err("a line ends in a lone backslash");
                };
                cur.push(next);
                in_word = true;
            }
            '"' => {
                quoted = !quoted;
                in_word = true;
            }
            ' ' | '\t' if !quoted => {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            c => {
                cur.push(c);
                in_word = true;
            }
        }
    }
    if quoted {
        return Err("a quoted string is not closed");
    }
    if in_word {
        words.push(cur);
    }
    Ok(words)
}

/// What to do about an `ERR` from upsd.
fn refusal_fix(code: &str) -> &'static str {
    match code {
        "ACCESS-DENIED" => "upsd does not let this host read the UPS: allow it in upsd.conf / upsd.users",
        "UNKNOWN-UPS" => "there is no UPS of that name on the server: use a name `upsc -l <server>` lists",
        "DRIVER-NOT-CONNECTED" => "upsd has no driver running for that UPS: start it (upsdrvctl start) and check its log",
        "DATA-STALE" => "the UPS driver has lost contact with the UPS: check the UPS's cable and the driver's log",
        "USERNAME-REQUIRED" | "PASSWORD-REQUIRED" => {
            "this upsd requires a login, which cairnd does not do: allow anonymous reads of the UPS"
        }
        _ => "see the NUT network protocol documentation for this error",
    }
}

/// Lines from upsd, within the deadline and the bounds.
struct Lines<'a> {
    stream: &'a TcpStream,
    server: &'a str,
    timeout: Duration,
    deadline: Instant,
    buf: Vec<u8>,
    total: usize,
}

impl Lines<'_> {
    fn protocol(&self, problem: impl Into<String>) -> PowerError {
        PowerError::NutProtocol {
            server: self.server.to_owned(),
            problem: problem.into(),
        }
    }

    fn next_line(&mut self) -> Result<String, PowerError> {
        loop {
            if let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
                let rest = self.buf.split_off(pos + 1);
                let mut line = std::mem::replace(&mut self.buf, rest);
                line.truncate(pos);
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                if line.len() > MAX_LINE {
                    return Err(self.protocol(format!("a line is longer than {MAX_LINE} bytes")));
                }
                return Ok(String::from_utf8_lossy(&line).into_owned());
            }
            if self.buf.len() > MAX_LINE {
                return Err(self.protocol(format!("a line is longer than {MAX_LINE} bytes")));
            }
            let left = self.deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(self.timed_out());
            }
            self.stream
                .set_read_timeout(Some(left))
                .map_err(|e| self.io(e))?;
            let mut chunk = [0u8; 4096];
            let mut stream = self.stream;
            let n = match stream.read(&mut chunk) {
                Ok(0) => {
                    return Err(self.protocol("it closed the connection in the middle of an answer"))
                }
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(self.timed_out())
                }
                Err(e) => return Err(self.io(e)),
            };
            self.total += n;
            if self.total > MAX_BYTES {
                return Err(self.protocol(format!("it sent more than {MAX_BYTES} bytes")));
            }
            self.buf
                .extend_from_slice(chunk.get(..n).unwrap_or_default());
        }
    }

    fn timed_out(&self) -> PowerError {
        PowerError::NutTimeout {
            server: self.server.to_owned(),
            timeout: self.timeout,
        }
    }

    fn io(&self, source: std::io::Error) -> PowerError {
        PowerError::NutIo {
            server: self.server.to_owned(),
            source,
        }
    }
}

/// A line quoted for an error message, cut short.
fn shown(line: &str) -> String {
    let cut: String = line.chars().take(80).collect();
    format!("{cut:?}")
}

/// Connects to the first address of the server that answers, within the deadline.
fn connect(cfg: &UpsConfig, deadline: Instant) -> Result<TcpStream, PowerError> {
    let server = cfg.server.clone();
    let (host, port) = cfg.host_port();
    let addrs: Vec<SocketAddr> = (host.as_str(), port)
        .to_socket_addrs()
        .map_err(|source| PowerError::NutResolve {
            server: server.clone(),
            source,
        })?
        .collect();
    let mut last = std::io::Error::new(
        std::io::ErrorKind::NotFound,
        "the name resolves to no address",
    );
    for addr in addrs {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(PowerError::NutTimeout {
                server,
                timeout: cfg.timeout,
            });
        }
        match TcpStream::connect_timeout(&addr, left) {
            Ok(s) => return Ok(s),
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                return Err(PowerError::NutTimeout {
                    server,
                    timeout: cfg.timeout,
                })
            }
            Err(e) => last = e,
        }
    }
    Err(PowerError::NutConnect {
        server,
        source: last,
    })
}

/// `LIST VAR <ups>`: every variable of the UPS.
pub fn list_vars(cfg: &UpsConfig) -> Result<BTreeMap<String, String>, PowerError> {
    cfg.validate()?;
    let deadline = Instant::now() + cfg.timeout;
    let stream = connect(cfg, deadline)?;
    let server = cfg.server.as_str();
    let ups = cfg.ups.as_str();
    let mut lines = Lines {
        stream: &stream,
        server,
        timeout: cfg.timeout,
        deadline,
        buf: Vec::new(),
        total: 0,
    };
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(lines.timed_out());
    }
    stream
        .set_write_timeout(Some(left))
        .and_then(|()| (&stream).write_all(format!("LIST VAR {ups}\n").as_bytes()))
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => lines.timed_out(),
            _ => lines.io(e),
        })?;

    let refused = |words: &[String]| PowerError::NutRefused {
        server: server.to_owned(),
        ups: ups.to_owned(),
        code: words.get(1).cloned().unwrap_or_default(),
        fix: refusal_fix(words.get(1).map(String::as_str).unwrap_or_default()),
    };
    let first = lines.next_line()?;
    let words = tokenize(&first).map_err(|p| lines.protocol(format!("{p}: {}", shown(&first))))?;
    match words
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["ERR", ..] => return Err(refused(&words)),
        ["BEGIN", "LIST", "VAR", u] if *u == ups => {}
        _ => {
            return Err(lines.protocol(format!(
                "expected BEGIN LIST VAR {ups}, got {}",
                shown(&first)
            )))
        }
    }
    let mut vars = BTreeMap::new();
    loop {
        let line = lines.next_line()?;
        let words =
            tokenize(&line).map_err(|p| lines.protocol(format!("{p}: {}", shown(&line))))?;
        match words
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .as_slice()
        {
            ["VAR", u, name, value] if *u == ups && !name.is_empty() => {
                if vars.len() >= MAX_VARS {
                    return Err(lines.protocol(format!("it sent more than {MAX_VARS} variables")));
                }
                vars.insert((*name).to_owned(), (*value).to_owned());
            }
            ["END", "LIST", "VAR", u] if *u == ups => break,
            ["ERR", ..] => return Err(refused(&words)),
            _ => {
                return Err(lines.protocol(format!(
                    "expected VAR {ups} <name> \"<value>\" or END LIST VAR {ups}, got {}",
                    shown(&line)
                )))
            }
        }
    }
    // Polite, and not worth an error if it fails: the connection is closed either way.
    let _ = (&stream).write_all(b"LOGOUT\n");
    Ok(vars)
}

/// Reads the UPS.
pub fn read_ups(cfg: &UpsConfig) -> Result<UpsStatus, PowerError> {
    Ok(UpsStatus::from_vars(&cfg.ups, list_vars(cfg)?))
}

/// nut_exporter's series: `network_ups_tools_ups_status{flag}` 1 for every flag set and 0 for its default
/// statuses that are not, the numeric variables, and `network_ups_tools_device_info`. All gauges.
pub fn samples(ups: &UpsStatus) -> Vec<Sample> {
    let mut out = Vec::new();
    if ups.vars.contains_key("ups.status") {
        let status = |flag: &str, v: f64| {
            Sample::gauge(
                "network_ups_tools_ups_status",
                "UPS status (ups.status)",
                vec![("flag", flag.to_owned())],
                v,
            )
        };
        let mut seen: Vec<&str> = Vec::new();
        for f in &ups.flags {
            if !seen.contains(&f.as_str()) {
                seen.push(f);
                out.push(status(f, 1.0));
            }
        }
        for f in DEFAULT_STATUSES {
            if !seen.contains(&f) {
                out.push(status(f, 0.0));
            }
        }
    }
    for (var, name, help) in VARIABLES {
        if let Some(v) = ups.vars.get(var).and_then(|v| parse_number(v)) {
            out.push(Sample::gauge(name, help, vec![], v));
        }
    }
    let labels = DEVICE_LABELS
        .iter()
        .map(|l| {
            let v = ups.vars.get(&format!("device.{l}")).cloned();
            (*l, v.unwrap_or_default())
        })
        .collect();
    out.push(Sample::gauge(
        "network_ups_tools_device_info",
        "UPS Device information",
        labels,
        1.0,
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufRead;
    use std::net::TcpListener;

    /// A fake upsd: accepts one connection, reads one request line, writes `answer`, keeps the connection
    /// open for `linger`. Returns the address and the request it got.
    fn upsd(
        answer: Vec<u8>,
        linger: Duration,
    ) -> (String, std::thread::JoinHandle<Option<String>>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let h = std::thread::spawn(move || {
            let (s, _) = l.accept().ok()?;
            let mut r = std::io::BufReader::new(&s);
            let mut req = String::new();
            r.read_line(&mut req).ok()?;
            let _ = (&s).write_all(&answer);
            std::thread::sleep(linger);
            Some(req)
        });
        (addr, h)
    }

    fn cfg(addr: &str) -> UpsConfig {
        UpsConfig {
            server: addr.to_owned(),
            ups: "ups1".into(),
            timeout: Duration::from_millis(500),
        }
    }

    const LIST: &str = "BEGIN LIST VAR ups1\n\
        VAR ups1 battery.charge \"87\"\n\
        VAR ups1 battery.runtime \"1260\"\n\
        VAR ups1 battery.voltage \"27.1\"\n\
        VAR ups1 device.mfr \"APC\"\n\
        VAR ups1 device.model \"Smart-UPS \\\"X\\\" 3000\"\n\
        VAR ups1 device.serial \"AS1234\"\n\
        VAR ups1 device.type \"ups\"\n\
        VAR ups1 input.voltage \"229.5\"\n\
        VAR ups1 ups.load \"41\"\n\
        VAR ups1 ups.power.nominal \"3000\"\n\
        VAR ups1 ups.status \"OL CHRG\"\n\
        VAR ups1 ups.test.result \"Done and passed\"\n\
        VAR ups1 driver.path \"C:\\\\nut\"\n\
        END LIST VAR ups1\n";

    #[test]
    fn lists_and_unescapes_variables() {
        let (addr, h) = upsd(LIST.replace('\n', "\r\n").into_bytes(), Duration::ZERO);
        let st = read_ups(&cfg(&addr)).unwrap();
        assert_eq!(h.join().unwrap().as_deref(), Some("LIST VAR ups1\n"));
        assert_eq!(st.flags, ["OL", "CHRG"]);
        assert!(!st.on_battery() && !st.low_battery());
        assert_eq!(st.battery_charge_percent, Some(87.0));
        assert_eq!(st.battery_runtime_secs, Some(1260.0));
        assert_eq!(st.load_percent, Some(41.0));
        assert_eq!(st.vars["device.model"], "Smart-UPS \"X\" 3000");
        assert_eq!(st.vars["driver.path"], "C:\\nut");
        assert_eq!(st.vars["ups.test.result"], "Done and passed");

        let s = samples(&st);
        let get = |name: &str| s.iter().find(|s| s.name == name).map(|s| s.value);
        assert_eq!(get("network_ups_tools_battery_charge"), Some(87.0));
        assert_eq!(get("network_ups_tools_battery_runtime"), Some(1260.0));
        assert_eq!(get("network_ups_tools_battery_voltage"), Some(27.1));
        assert_eq!(get("network_ups_tools_input_voltage"), Some(229.5));
        assert_eq!(get("network_ups_tools_ups_load"), Some(41.0));
        assert_eq!(get("network_ups_tools_ups_power_nominal"), Some(3000.0));
        assert_eq!(get("network_ups_tools_input_frequency"), None);
        let flag = |f: &str| {
            s.iter()
                .find(|s| {
                    s.name == "network_ups_tools_ups_status"
                        && s.labels == vec![("flag", f.to_owned())]
                })
                .map(|s| s.value)
        };
        assert_eq!(flag("OL"), Some(1.0));
        assert_eq!(flag("CHRG"), Some(1.0));
        assert_eq!(flag("OB"), Some(0.0));
        assert_eq!(flag("LB"), Some(0.0));
        assert_eq!(
            s.iter()
                .filter(|s| s.name == "network_ups_tools_ups_status")
                .count(),
            15
        );
        let info = s
            .iter()
            .find(|s| s.name == "network_ups_tools_device_info")
            .unwrap();
        let names: Vec<&str> = info.labels.iter().map(|(k, _)| *k).collect();
        assert_eq!(names, DEVICE_LABELS);
        assert!(info
            .labels
            .contains(&("model", "Smart-UPS \"X\" 3000".to_owned())));
        assert!(info.labels.contains(&("location", String::new())));
    }

    #[test]
    fn on_battery_and_unknown_flags() {
        let mut vars = BTreeMap::new();
        vars.insert(
            "ups.status".to_owned(),
            "OB  LB DISCHRG ALARM LB".to_owned(),
        );
        vars.insert("battery.runtime".to_owned(), "NaN".to_owned());
        let st = UpsStatus::from_vars("ups1", vars);
        assert!(st.on_battery() && st.low_battery());
        assert_eq!(st.battery_runtime_secs, None, "not a finite number");
        let s = samples(&st);
        let statuses: Vec<(&str, f64)> = s
            .iter()
            .filter(|s| s.name == "network_ups_tools_ups_status")
            .map(|s| (s.labels[0].1.as_str(), s.value))
            .collect();
        assert_eq!(
            statuses[..4],
            [("OB", 1.0), ("LB", 1.0), ("DISCHRG", 1.0), ("ALARM", 1.0)]
        );
        assert_eq!(statuses.len(), 4 + 12, "the duplicate LB once");
        let no_status = samples(&UpsStatus::from_vars("ups1", BTreeMap::new()));
        assert_eq!(no_status.len(), 1, "device_info only: {no_status:?}");
    }

    #[test]
    fn refusals_name_the_code_and_the_fix() {
        for (code, hint) in [
            ("ACCESS-DENIED", "upsd.conf"),
            ("UNKNOWN-UPS", "upsc -l"),
            ("DATA-STALE", "cable"),
            ("DRIVER-NOT-CONNECTED", "upsdrvctl"),
            ("SOMETHING-NEW", "protocol documentation"),
        ] {
            let (addr, _h) = upsd(format!("ERR {code}\n").into_bytes(), Duration::ZERO);
            let m = crate::error_chain(&read_ups(&cfg(&addr)).unwrap_err());
            assert!(
                m.contains(&addr) && m.contains(code) && m.contains("ups1") && m.contains(hint),
                "{m}"
            );
        }
        // An ERR in the middle of the list.
        let (addr, _h) = upsd(
            b"BEGIN LIST VAR ups1\nVAR ups1 a \"1\"\nERR DATA-STALE\n".to_vec(),
            Duration::ZERO,
        );
        let m = crate::error_chain(&read_ups(&cfg(&addr)).unwrap_err());
        assert!(m.contains("DATA-STALE"), "{m}");
    }

    #[test]
    fn garbage_is_a_protocol_error() {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (
                b"HTTP/1.1 400 Bad Request\r\n\r\n".to_vec(),
                "expected BEGIN LIST VAR ups1",
            ),
            (b"BEGIN LIST VAR other\n".to_vec(), "expected BEGIN"),
            (
                b"BEGIN LIST VAR ups1\nVAR ups1 x \"unterminated\n".to_vec(),
                "not closed",
            ),
            (
                b"BEGIN LIST VAR ups1\nVAR other x \"1\"\n".to_vec(),
                "expected VAR ups1",
            ),
            (
                b"BEGIN LIST VAR ups1\nVAR ups1 x \"1\" extra\n".to_vec(),
                "expected VAR",
            ),
            (
                b"BEGIN LIST VAR ups1\nVAR ups1 x \\".to_vec(),
                "closed the connection",
            ),
            (b"BEGIN LIST VAR ups1\n".to_vec(), "closed the connection"),
            (vec![0xAB; 3 * MAX_LINE], "longer than"),
            (
                {
                    let mut v = b"BEGIN LIST VAR ups1\nVAR ups1 x \"".to_vec();
                    v.extend(vec![b'a'; MAX_LINE + 10]);
                    v.extend(b"\"\n");
                    v
                },
                "longer than",
            ),
            (vec![0xff, 0xfe, b'\n'], "expected BEGIN"),
            (b"\n".to_vec(), "expected BEGIN"),
            (b"BEGIN LIST VAR ups1\n\\\n".to_vec(), "lone backslash"),
        ];
        for (answer, want) in cases {
            let (addr, _h) = upsd(answer.clone(), Duration::ZERO);
            let m = crate::error_chain(&read_ups(&cfg(&addr)).unwrap_err());
            assert!(
                m.contains(want) && m.contains(&addr),
                "{:?}: {m}",
                String::from_utf8_lossy(&answer)
            );
        }
    }

    #[test]
    fn too_many_variables_is_an_error() {
        let mut answer = b"BEGIN LIST VAR ups1\n".to_vec();
        for i in 0..=MAX_VARS {
            answer.extend(format!("VAR ups1 v{i} \"1\"\n").as_bytes());
        }
        answer.extend(b"END LIST VAR ups1\n");
        let (addr, _h) = upsd(answer, Duration::ZERO);
        let m = crate::error_chain(&read_ups(&cfg(&addr)).unwrap_err());
        assert!(m.contains("more than 2048 variables"), "{m}");
    }

    #[test]
    fn a_server_that_never_answers_times_out() {
        // Accepts and reads the request, then says nothing.
        let (addr, _h) = upsd(Vec::new(), Duration::from_secs(3));
        let mut c = cfg(&addr);
        c.timeout = Duration::from_millis(300);
        let t = Instant::now();
        let m = crate::error_chain(&read_ups(&c).unwrap_err());
        assert!(
            m.contains("did not answer within 300ms") && m.contains(&addr),
            "{m}"
        );
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());

        // Never even accepts: the kernel completes the handshake, nobody answers.
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let m = crate::error_chain(&read_ups(&cfg(&addr)).unwrap_err());
        assert!(m.contains("did not answer"), "{m}");
        drop(l);
    }

    #[test]
    fn a_slow_drip_is_bounded_by_the_whole_timeout() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let h = std::thread::spawn(move || {
            let Ok((s, _)) = l.accept() else { return };
            for _ in 0..40 {
                if (&s).write_all(b"B").is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        let mut c = cfg(&addr);
        c.timeout = Duration::from_millis(300);
        let t = Instant::now();
        let m = crate::error_chain(&read_ups(&c).unwrap_err());
        assert!(m.contains("did not answer"), "{m}");
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
        let _ = h.join();
    }

    #[test]
    fn a_closed_port_is_a_connect_error() {
        let addr = {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().to_string()
        };
        let m = crate::error_chain(&read_ups(&cfg(&addr)).unwrap_err());
        assert!(
            m.contains("cannot connect") && m.contains(&addr) && m.contains("upsd"),
            "{m}"
        );
    }

    #[test]
    fn configuration_is_checked_before_the_network() {
        for (server, ups) in [
            ("", "ups1"),
            ("h:1", ""),
            ("h:1", "two words"),
            ("h:1", "q\"uote"),
            ("h:1", "new\nline"),
        ] {
            let err = read_ups(&UpsConfig::new(server, ups)).unwrap_err();
            assert!(
                matches!(err, PowerError::UpsConfig { .. }),
                "{server:?} {ups:?}: {err}"
            );
        }
        let mut c = UpsConfig::new("h:1", "ups1");
        c.timeout = Duration::ZERO;
        assert!(c.validate().is_err());
    }

    #[test]
    fn server_addresses() {
        let hp = |s: &str| UpsConfig::new(s, "u").host_port();
        assert_eq!(hp("10.0.0.5"), ("10.0.0.5".into(), 3493));
        assert_eq!(hp("10.0.0.5:4000"), ("10.0.0.5".into(), 4000));
        assert_eq!(hp("nut.local"), ("nut.local".into(), 3493));
        assert_eq!(hp("nut.local:4000"), ("nut.local".into(), 4000));
        assert_eq!(hp("[::1]:4000"), ("::1".into(), 4000));
        assert_eq!(hp("::1"), ("::1".into(), 3493));
        assert_eq!(hp(" h:bad "), ("h:bad".into(), 3493));
    }

    #[test]
    fn tokenizer() {
        let t = |s: &str| tokenize(s);
        assert_eq!(
            t(r#"VAR ups1 ups.status "OL CHRG""#).unwrap(),
            ["VAR", "ups1", "ups.status", "OL CHRG"]
        );
        assert_eq!(
            t(r#"VAR u x "a \"b\" \\ c""#).unwrap(),
            ["VAR", "u", "x", r#"a "b" \ c"#]
        );
        assert_eq!(t(r#"VAR u x """#).unwrap(), ["VAR", "u", "x", ""]);
        assert_eq!(t("  a\t b  ").unwrap(), ["a", "b"]);
        assert_eq!(t("").unwrap(), Vec::<String>::new());
        assert!(t(r#"VAR u x "open"#).is_err());
        assert!(t("x \\").is_err());
    }
}
