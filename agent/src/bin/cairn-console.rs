//! cairn-console: the status screen on the local console (cairn-console@tty1, and --plain on the serial
//! console). Asks cairnd for the overview over the control socket and draws it; reads no input and sends
//! no command that changes anything.
//! Exit codes: 0 after --once, 1 when the terminal goes away, 2 usage; it runs until stopped otherwise.

use cairn_agent::console::{self, Screen};
use cairn_agent::{config, control};
use cairn_proto::control::{Command, Response};
use clap::Parser;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser)]
#[command(version, about = "Show the box's status on a console, live, read-only")]
struct Args {
    /// The agent's configuration file (to find its control socket); default: the agent's own search.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Talk to this control socket instead of the configured one.
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Seconds between redraws.
    #[arg(long, default_value_t = 2)]
    interval: u64,
    /// For serial consoles and logs: no cursor control, no colour, no QR code; the screen is printed again
    /// when a line changes level or advice, and every 5 minutes.
    #[arg(long)]
    plain: bool,
    /// Draw once and exit.
    #[arg(long)]
    once: bool,
}

/// How often --plain prints the screen again when nothing changed, for a serial cable plugged in later.
const PLAIN_REPRINT: Duration = Duration::from_secs(300);

/// The terminal's size, or 80×24 when stdout is not a terminal.
fn size() -> (usize, usize) {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes a winsize into the pointer it is given, which points at a live local.
    let ok = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut ws) } == 0;
    if ok && ws.ws_col > 0 && ws.ws_row > 0 {
        (usize::from(ws.ws_col), usize::from(ws.ws_row))
    } else {
        (80, 24)
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    // A configuration that does not load is shown on the screen (and read again each round), not just
    // logged: the screen is where someone will look.
    let socket = || match args.socket.clone() {
        Some(s) => Ok(s),
        None => config::load(&config::Sources::system(args.config.clone()))
            .map(|l| l.config.agent.control_socket)
            .map_err(|e| {
                format!(
                    "the agent's configuration does not load: {}",
                    cairn_agent::error_chain(&e)
                )
            }),
    };
    // SAFETY: isatty only inspects the descriptor.
    let tty = unsafe { libc::isatty(libc::STDOUT_FILENO) } == 1;
    let colour = !args.plain && tty && std::env::var_os("NO_COLOR").is_none();
    let mut last_plain = String::new();
    let mut printed = std::time::Instant::now();
    let mut out = std::io::stdout();
    if !args.plain && !args.once {
        // Hide the cursor: nothing on this screen takes input.
        let _ = out.write_all(b"\x1b[?25l\x1b[2J");
    }
    loop {
        let (width, height) = size();
        // The QR code is drawn when it fits the terminal; once is drawn whole, and a serial log gets none.
        let room = if args.plain {
            0
        } else if args.once {
            usize::MAX / 2
        } else {
            height
        };
        let screen = Screen {
            width,
            height: room,
            colour,
        };
        let now = cairn_agent::status::now_unix();
        let (lines, stable) = match socket().and_then(|p| {
            control::request(&p, Command::Overview, Duration::from_secs(5))
                .map_err(|e| cairn_agent::error_chain(&e))
        }) {
            Ok(Response::Overview(o)) => {
                let lines = console::render(&o, screen);
                let stable = console::plain_key(&o);
                (lines, stable)
            }
            Ok(other) => {
                let why = format!("cairnd sent an unexpected answer: {other:?}");
                (console::render_unreachable(&why, now, screen), why)
            }
            Err(why) => (console::render_unreachable(&why, now, screen), why),
        };
        let text = if args.plain || args.once {
            if args.plain && stable == last_plain && printed.elapsed() < PLAIN_REPRINT {
                None
            } else {
                last_plain = stable;
                printed = std::time::Instant::now();
                Some(format!("{}\n\n", lines.join("\n")))
            }
        } else {
            Some(console::frame(&lines, height))
        };
        if let Some(t) = text {
            if out
                .write_all(t.as_bytes())
                .and_then(|()| out.flush())
                .is_err()
            {
                // The terminal went away (serial unplugged, tty closed): systemd restarts the unit.
                return ExitCode::FAILURE;
            }
        }
        if args.once {
            return ExitCode::SUCCESS;
        }
        std::thread::sleep(Duration::from_secs(args.interval.max(1)));
    }
}
