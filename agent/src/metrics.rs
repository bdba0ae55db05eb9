//! `GET /metrics` in the Prometheus text format: the collectors' latest samples (named as dcgm-exporter,
//! smartctl_exporter, node_exporter, ipmi_exporter and nut_exporter name them, so existing dashboards work)
//! and the agent's own `cairn_*` series from the status board.

use crate::status::StatusBoard;
use crate::telemetry::{LocalSink, Sample};
use cairn_proto::control::{ComponentStatus, HealthState, Status};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::fmt::Write;
use tokio::net::TcpListener;

pub async fn serve(listener: TcpListener, board: StatusBoard, sink: LocalSink) {
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
        let sink = sink.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let body = match (req.method(), req.uri().path()) {
                    (&hyper::Method::GET, "/metrics") => {
                        let mut text = render(&board.snapshot());
                        render_samples(&mut text, &sink.all_samples());
                        Ok(text)
                    }
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

/// Renders collector samples: one HELP/TYPE header per metric name, series grouped under it (the text format
/// requires a name's series to be contiguous), in the order names first appear.
pub fn render_samples(out: &mut String, samples: &[Sample]) {
    let mut order: Vec<&'static str> = Vec::new();
    let mut by_name: std::collections::HashMap<&'static str, Vec<&Sample>> =
        std::collections::HashMap::new();
    for s in samples {
        by_name
            .entry(s.name)
            .or_insert_with(|| {
                order.push(s.name);
                Vec::new()
            })
            .push(s);
    }
    for name in order {
        let series = &by_name[name];
        header(out, name, series[0].kind.as_str(), series[0].help);
        for s in series {
            out.push_str(name);
            if !s.labels.is_empty() {
                out.push('{');
                for (i, (k, v)) in s.labels.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    let _ = write!(out, "{k}=\"{}\"", escape(v));
                }
                out.push('}');
            }
            let _ = writeln!(out, " {}", value(s.value));
        }
    }
}

/// Prometheus float text: integers without a fraction, and the special values it spells its own way.
fn value(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 {
            "+Inf".into()
        } else {
            "-Inf".into()
        }
    } else if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
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

pub fn render(s: &Status) -> String {
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
    }
    if !s.health.is_empty() {
        header(
            &mut out,
            "cairn_health_state",
            "gauge",
            "1 for the health state each component is in (ok, degraded, failed, unknown), 0 for the others.",
        );
        for c in &s.health {
            for state in [
                HealthState::Ok,
                HealthState::Degraded,
                HealthState::Failed,
                HealthState::Unknown,
            ] {
                let _ = writeln!(
                    out,
                    "cairn_health_state{{component=\"{}\",kind=\"{}\",state=\"{}\"}} {}",
                    escape(&c.component),
                    escape(&c.kind),
                    state.as_str(),
                    u8::from(c.state == state)
                );
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_render_grouped_with_one_header_and_escaped_labels() {
        let samples = vec![
            Sample::gauge("a_temp", "Temp.", vec![("gpu", "0".into())], 40.0),
            Sample::counter("b_total", "Count.", vec![], 1.5),
            Sample::gauge(
                "a_temp",
                "Temp.",
                vec![("gpu", "1\"x\\y\n".into())],
                f64::NAN,
            ),
        ];
        let mut out = String::new();
        render_samples(&mut out, &samples);
        assert_eq!(
            out,
            "# HELP a_temp Temp.\n# TYPE a_temp gauge\na_temp{gpu=\"0\"} 40\na_temp{gpu=\"1\\\"x\\\\y\\n\"} NaN\n\
             # HELP b_total Count.\n# TYPE b_total counter\nb_total 1.5\n"
        );
    }
}
