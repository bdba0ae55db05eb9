//! `GET /metrics` in the Prometheus text format, rendered from the status board. GPU series use
//! dcgm-exporter's names and labels so existing dashboards work; the rest are `cairn_*`.

use crate::status::StatusBoard;
use cairn_proto::control::{ComponentStatus, Status};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::fmt::Write;
use tokio::net::TcpListener;

pub async fn serve(listener: TcpListener, board: StatusBoard) {
    let hostname = nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_default();
    loop {
        let (tcp, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "metrics accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let board = board.clone();
        let hostname = hostname.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let body = match (req.method(), req.uri().path()) {
                    (&hyper::Method::GET, "/metrics") => Ok(render(&board.snapshot(), &hostname)),
                    _ => Err(StatusCode::NOT_FOUND),
                };
                async move {
                    match body {
                        Ok(text) => Response::builder()
                            .header("content-type", "text/plain; version=0.0.4; charset=utf-8")
                            .body(Full::new(Bytes::from(text))),
                        Err(code) => Response::builder()
                            .status(code)
                            .body(Full::new(Bytes::from_static(b"not found\n"))),
                    }
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

fn up<T>(c: &ComponentStatus<T>) -> u8 {
    u8::from(matches!(c, ComponentStatus::Ok { .. }))
}

pub fn render(s: &Status, hostname: &str) -> String {
    let mut out = String::with_capacity(4096);
    header(
        &mut out,
        "cairn_build_info",
        "gauge",
        "Version of the running cairn agent.",
    );
    let _ = writeln!(
        out,
        "cairn_build_info{{version=\"{}\"}} 1",
        escape(&s.agent.version)
    );
    header(
        &mut out,
        "cairn_agent_uptime_seconds",
        "gauge",
        "Seconds since cairnd started.",
    );
    let _ = writeln!(out, "cairn_agent_uptime_seconds {}", s.agent.uptime_secs);
    header(
        &mut out,
        "cairn_component_up",
        "gauge",
        "1 if the agent could use the component at its last check.",
    );
    for (name, v) in [
        ("tpm", up(&s.tpm)),
        ("gpus", up(&s.gpus)),
        ("sensors", up(&s.sensors)),
        ("fleet", up(&s.fleet)),
    ] {
        let _ = writeln!(out, "cairn_component_up{{component=\"{name}\"}} {v}");
    }
    if let Some(f) = s.fleet.facts() {
        header(
            &mut out,
            "cairn_fleet_round_trip_seconds",
            "gauge",
            "Duration of the last successful fleet check.",
        );
        let _ = writeln!(
            out,
            "cairn_fleet_round_trip_seconds {}",
            f.round_trip_us as f64 / 1e6
        );
    }
    if let Some(g) = s.gpus.facts() {
        header(&mut out, "cairn_gpus", "gauge", "GPUs NVML reports.");
        let _ = writeln!(out, "cairn_gpus {}", g.gpus.len());
        let labels = |gpu: &cairn_proto::control::GpuSummary| {
            format!(
                "gpu=\"{}\",UUID=\"{}\",pci_bus_id=\"{}\",device=\"nvidia{}\",modelName=\"{}\",Hostname=\"{}\"",
                gpu.index,
                escape(&gpu.uuid),
                escape(&gpu.pci_bus_id),
                gpu.index,
                escape(&gpu.name),
                escape(hostname)
            )
        };
        header(
            &mut out,
            "DCGM_FI_DEV_GPU_TEMP",
            "gauge",
            "GPU temperature (in C).",
        );
        for gpu in &g.gpus {
            if let Some(t) = gpu.temperature_c {
                let _ = writeln!(out, "DCGM_FI_DEV_GPU_TEMP{{{}}} {t}", labels(gpu));
            }
        }
        header(
            &mut out,
            "DCGM_FI_DEV_POWER_USAGE",
            "gauge",
            "Power draw (in W).",
        );
        for gpu in &g.gpus {
            if let Some(p) = gpu.power_w {
                let _ = writeln!(out, "DCGM_FI_DEV_POWER_USAGE{{{}}} {p}", labels(gpu));
            }
        }
    }
    if let Some(sensors) = s.sensors.facts() {
        header(
            &mut out,
            "cairn_nvme_drives",
            "gauge",
            "NVMe controllers seen in sysfs.",
        );
        let _ = writeln!(out, "cairn_nvme_drives {}", sensors.nvme_drives.len());
    }
    out
}
