//! The local status page: the overview as HTML for a browser on the management network, read-only. It
//! answers GET and HEAD for `/` (the page, complete without JavaScript), `/overview.json` (what the page's
//! script polls to refresh itself) and nothing else. Sockets are bound to their interface
//! (SO_BINDTODEVICE), so the page answers on the management port and on no other, whatever addresses the
//! ports get from DHCP later.

use crate::control::Context;
use cairn_proto::overview::{Level, Overview};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::HeaderValue;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::fmt::Write;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::time::Duration;
use tokio::net::TcpListener;

/// How often a missing interface is looked for again (a USB NIC plugged in later, a rename by udev).
const REBIND_EVERY: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum PageError {
    #[error("cannot serve the local page on {addr}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot serve the local page on interface {interface} port {port}")]
    Interface {
        interface: String,
        port: u16,
        #[source]
        source: std::io::Error,
    },
}

/// A listening socket bound to one interface: IPv6 and IPv4 both, unless the kernel has no IPv6.
pub fn bind_interface(interface: &str, port: u16) -> Result<TcpListener, PageError> {
    use nix::sys::socket::{
        self, sockopt, AddressFamily, SockFlag, SockType, SockaddrIn, SockaddrIn6,
    };
    let err = |e: nix::Error| PageError::Interface {
        interface: interface.to_owned(),
        port,
        source: std::io::Error::from(e),
    };
    let flags = SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK;
    let (fd, v6): (OwnedFd, bool) =
        match socket::socket(AddressFamily::Inet6, SockType::Stream, flags, None) {
            Ok(fd) => (fd, true),
            Err(_) => (
                socket::socket(AddressFamily::Inet, SockType::Stream, flags, None).map_err(err)?,
                false,
            ),
        };
    socket::setsockopt(&fd, sockopt::ReuseAddr, &true).map_err(err)?;
    socket::setsockopt(
        &fd,
        sockopt::BindToDevice,
        &std::ffi::OsString::from(interface),
    )
    .map_err(err)?;
    if v6 {
        socket::setsockopt(&fd, sockopt::Ipv6V6Only, &false).map_err(err)?;
        let any = SockaddrIn6::from(std::net::SocketAddrV6::new(
            std::net::Ipv6Addr::UNSPECIFIED,
            port,
            0,
            0,
        ));
        socket::bind(std::os::fd::AsRawFd::as_raw_fd(&fd), &any).map_err(err)?;
    } else {
        let any = SockaddrIn::from(std::net::SocketAddrV4::new(
            std::net::Ipv4Addr::UNSPECIFIED,
            port,
        ));
        socket::bind(std::os::fd::AsRawFd::as_raw_fd(&fd), &any).map_err(err)?;
    }
    socket::listen(&fd, socket::Backlog::new(64).map_err(err)?).map_err(err)?;
    TcpListener::from_std(std::net::TcpListener::from(fd)).map_err(|source| PageError::Interface {
        interface: interface.to_owned(),
        port,
        source,
    })
}

pub async fn bind_addr(addr: SocketAddr) -> Result<TcpListener, PageError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| PageError::Listen { addr, source })
}

/// Serves the page on every configured interface and address until aborted. An interface that is not there
/// yet is bound when it appears; an address that cannot be bound is logged and not retried (it is a
/// configuration mistake, and the configuration does not change while the agent runs).
pub async fn run(ctx: Context) {
    let cfg = ctx.overview.page.clone();
    // Held here so that aborting this task (at shutdown) aborts every listener with it.
    let mut tasks = tokio::task::JoinSet::new();
    for addr in &cfg.listen {
        match bind_addr(*addr).await {
            Ok(l) => {
                tracing::info!(%addr, "local page listening");
                tasks.spawn(serve(l, ctx.clone()));
            }
            Err(e) => tracing::warn!("{}", crate::error_chain(&e)),
        }
    }
    for interface in cfg.interfaces.clone() {
        let ctx = ctx.clone();
        let port = cfg.port;
        tasks.spawn(async move {
            let mut warned = false;
            loop {
                match bind_interface(&interface, port) {
                    Ok(l) => {
                        tracing::info!(%interface, port, "local page listening");
                        return serve(l, ctx).await;
                    }
                    Err(e) => {
                        if !warned {
                            tracing::warn!(
                                "{}; trying again every {} s",
                                crate::error_chain(&e),
                                REBIND_EVERY.as_secs()
                            );
                            warned = true;
                        }
                        tokio::time::sleep(REBIND_EVERY).await;
                    }
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}
}

pub async fn serve(listener: TcpListener, ctx: Context) {
    loop {
        let (tcp, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "local page accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let answer = respond(req.method(), req.uri().path(), &ctx);
                async move { Ok::<_, std::convert::Infallible>(answer) }
            });
            // A client that never finishes its headers is dropped, so a stuck laptop cannot pin a task.
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}

fn respond(method: &Method, path: &str, ctx: &Context) -> Response<Full<Bytes>> {
    let reply = |code: StatusCode, kind: &'static str, body: String| {
        let body = if method == Method::HEAD {
            String::new()
        } else {
            body
        };
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = code;
        let h = r.headers_mut();
        h.insert("content-type", HeaderValue::from_static(kind));
        // Nothing from elsewhere, nothing framed, nothing cached: the page is the box's word, now.
        let csp = format!(
            "default-src 'none'; script-src 'self' {}; style-src 'unsafe-inline'; connect-src 'self'; img-src data:",
            script_hash()
        );
        // The policy is ASCII by construction; were it not, the page goes without it rather than not at all.
        if let Ok(v) = HeaderValue::from_str(&csp) {
            h.insert("content-security-policy", v);
        }
        h.insert("x-frame-options", HeaderValue::from_static("DENY"));
        h.insert("cache-control", HeaderValue::from_static("no-store"));
        r
    };
    if method != Method::GET && method != Method::HEAD {
        let mut r = reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            "the local page is read-only: only GET and HEAD\n".into(),
        );
        r.headers_mut()
            .insert("allow", HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    match path {
        "/" | "/index.html" => reply(
            StatusCode::OK,
            "text/html; charset=utf-8",
            page(&crate::overview::snapshot(ctx)),
        ),
        "/overview.json" => match serde_json::to_string(&crate::overview::snapshot(ctx)) {
            Ok(j) => reply(StatusCode::OK, "application/json", j),
            Err(e) => reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/plain; charset=utf-8",
                format!("{e}\n"),
            ),
        },
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "not found: the page is at /\n".into(),
        ),
    }
}

pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// The refresh script: polls `/overview.json` and redraws the same markup the server writes, so the page
/// stays live without a reload and still reads whole without JavaScript.
const SCRIPT: &str = r#"
"use strict";
function esc(s){return String(s).replace(/[&<>"']/g,function(c){return {"&":"&amp;","<":"&lt;",">":"&gt;",'"':"&quot;","'":"&#39;"}[c];});}
function draw(o){
  var h='';
  o.lines.forEach(function(l){
    h+='<tr class="'+l.level+'"><th>'+esc(l.topic)+'</th><td>'+esc(l.text)+
      (l.next_step?'<div class="next">Next: '+esc(l.next_step)+'</div>':'')+'</td></tr>';
  });
  document.getElementById('lines').innerHTML=h;
  var v=document.getElementById('verdict');v.className='verdict '+o.verdict;v.textContent=o.headline;
  var e='';
  o.events.slice().reverse().forEach(function(x){
    e+='<li class="'+x.severity+'">'+esc(new Date(x.at_unix_ms).toISOString().replace('T',' ').slice(0,19))+' UTC '+esc(x.component)+': '+esc(x.message)+'</li>';
  });
  document.getElementById('events').innerHTML=e;
  var u=document.getElementById('updated');
  u.textContent='live, updated '+new Date(o.generated_unix*1000).toISOString().slice(11,19)+' UTC';
  u.setAttribute('data-live','yes');
}
function tick(){
  fetch('/overview.json',{cache:'no-store'}).then(function(r){if(!r.ok)throw new Error(r.status);return r.json();})
  .then(draw).catch(function(){var u=document.getElementById('updated');u.textContent='the box is not answering: the page shows its last word';u.setAttribute('data-live','no');});
}
tick();setInterval(tick,3000);
"#;

fn script_hash() -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, SCRIPT.as_bytes());
    format!("'sha256-{}'", base64(d.as_ref()))
}

fn base64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, b)| acc | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(A[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

const STYLE: &str = "body{font-family:sans-serif;margin:1.5em;background:#111;color:#eee;font-size:1.2em}\
h1{margin:0 0 .2em}table{border-collapse:collapse;width:100%}th{text-align:left;padding:.4em 1em .4em .4em;\
vertical-align:top;white-space:nowrap}td{padding:.4em}tr{border-bottom:1px solid #333}\
tr.ok th{color:#3c3}tr.attention th{color:#ec3}tr.fault th{color:#f55}tr.fault td{color:#fbb}\
.next{color:#fff;font-weight:bold;margin-top:.2em}.verdict{font-size:1.6em;font-weight:bold;margin:.4em 0}\
.verdict.ok{color:#3c3}.verdict.attention{color:#ec3}.verdict.fault{color:#f55}\
.id{color:#aaa;word-break:break-all}#updated{color:#888}li.critical{color:#f55}li.warning{color:#ec3}";

/// The page, server-side: the same markup the script redraws.
pub fn page(o: &Overview) -> String {
    let mut h = String::new();
    let _ = write!(
        h,
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" \
         content=\"width=device-width\"><title>cairn {}</title><style>{STYLE}</style></head><body>",
        escape(o.code.as_deref().unwrap_or("box"))
    );
    let _ = write!(
        h,
        "<h1>cairn box {}</h1>",
        escape(o.code.as_deref().unwrap_or("(no device id yet)"))
    );
    let _ = write!(
        h,
        "<div>site: {} · version {}{}</div>",
        escape(o.site.as_deref().unwrap_or("not set")),
        escape(&o.version),
        o.slot
            .as_deref()
            .map(|s| format!(" (slot {})", escape(s)))
            .unwrap_or_default()
    );
    if let Some(id) = &o.device_id {
        let _ = write!(h, "<div class=\"id\">device id {}</div>", escape(id));
    }
    let level = |l: Level| l.as_str();
    let _ = write!(
        h,
        "<div id=\"verdict\" class=\"verdict {}\">{}</div>",
        level(o.verdict),
        escape(&o.headline)
    );
    h.push_str("<table><tbody id=\"lines\">");
    for l in &o.lines {
        let _ = write!(
            h,
            "<tr class=\"{}\"><th>{}</th><td>{}",
            level(l.level),
            escape(&l.topic),
            escape(&l.text)
        );
        if let Some(n) = &l.next_step {
            let _ = write!(h, "<div class=\"next\">Next: {}</div>", escape(n));
        }
        h.push_str("</td></tr>");
    }
    h.push_str("</tbody></table><h2>Recent events</h2><ul id=\"events\">");
    for e in o.events.iter().rev() {
        let _ = write!(
            h,
            "<li class=\"{}\">{} UTC {}: {}</li>",
            match e.severity {
                cairn_proto::control::Severity::Info => "info",
                cairn_proto::control::Severity::Warning => "warning",
                cairn_proto::control::Severity::Critical => "critical",
            },
            crate::view::utc(e.at_unix_ms / 1000),
            escape(&e.component),
            escape(&e.message)
        );
    }
    let _ = write!(
        h,
        "</ul><p id=\"updated\" data-live=\"no\">as of {} UTC (read-only: nothing on this page changes the box)</p>\
         <script>{SCRIPT}</script></body></html>",
        crate::view::utc(o.generated_unix)
    );
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_the_rfc_vectors() {
        for (raw, enc) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(raw.as_bytes()), enc);
        }
    }

    #[test]
    fn text_from_the_device_is_escaped() {
        assert_eq!(
            escape("<b a=\"1\">&'"),
            "&lt;b a=&quot;1&quot;&gt;&amp;&#39;"
        );
    }
}
