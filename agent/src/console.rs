//! The console status screen (tty1 and the serial console): the overview laid out for a monitor across the
//! room. Every line starts with a word (OK, WAIT, FAIL) as well as a colour, so it reads on a monochrome
//! serial terminal too; red lines carry their next step under them. Nothing here reads input: the screen
//! only shows.

use cairn_proto::overview::{Level, Overview};
use std::fmt::Write;

/// How to draw: the terminal's size and whether it takes ANSI colour.
#[derive(Debug, Clone, Copy)]
pub struct Screen {
    pub width: usize,
    pub height: usize,
    pub colour: bool,
}

const TOPIC_WIDTH: usize = 12;

fn paint(colour: bool, code: &str, text: &str) -> String {
    if colour {
        format!("\x1b[{code}m{text}\x1b[0m")
    } else {
        text.to_owned()
    }
}

fn mark(level: Level) -> (&'static str, &'static str) {
    match level {
        Level::Ok => (" OK ", "1;32"),
        Level::Attention => ("WAIT", "1;33"),
        Level::Fault => ("FAIL", "1;31"),
    }
}

/// Splits text into lines of at most `width` characters at spaces (a longer word is cut).
pub fn wrap(text: &str, width: usize) -> Vec<String> {
    let width = width.max(10);
    let mut out = Vec::new();
    let mut line = String::new();
    for word in text.split_whitespace() {
        let mut word = word.to_owned();
        while word.chars().count() > width {
            if !line.is_empty() {
                out.push(std::mem::take(&mut line));
            }
            let cut: String = word.chars().take(width).collect();
            word = word.chars().skip(width).collect();
            out.push(cut);
        }
        let len = line.chars().count();
        if len > 0 && len + 1 + word.chars().count() > width {
            out.push(std::mem::take(&mut line));
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(&word);
    }
    if !line.is_empty() || out.is_empty() {
        out.push(line);
    }
    out
}

/// What the QR code holds: the code and the device id, in QR's alphanumeric alphabet so it stays small.
pub fn qr_payload(o: &Overview) -> Option<String> {
    let id = o.device_id.as_deref()?;
    let code = o.code.as_deref().unwrap_or("");
    Some(format!("CAIRN:{code}:{}", id.to_uppercase()))
}

/// A QR code drawn with half blocks, two modules per character row, with its quiet zone; dark modules are
/// drawn as spaces on a light background so any terminal colour scheme scans.
pub fn qr_lines(text: &str) -> Vec<String> {
    let Ok(qr) = qrcodegen::QrCode::encode_text(text, qrcodegen::QrCodeEcc::Low) else {
        return Vec::new();
    };
    let quiet = 2;
    let size = qr.size();
    let dark = |x: i32, y: i32| x >= 0 && y >= 0 && x < size && y < size && qr.get_module(x, y);
    let mut lines = Vec::new();
    let mut y = -quiet;
    while y < size + quiet {
        let mut row = String::new();
        for x in -quiet..size + quiet {
            // Light is drawn, dark is left blank: '█' both light, '▀' top light, '▄' bottom light.
            row.push(match (dark(x, y), dark(x, y + 1)) {
                (false, false) => '█',
                (false, true) => '▀',
                (true, false) => '▄',
                (true, true) => ' ',
            });
        }
        lines.push(row);
        y += 2;
    }
    lines
}

/// One overview line: its mark, topic and text, then its next step under it.
fn line_rows(l: &cairn_proto::overview::Line, text_width: usize, colour_on: bool) -> Vec<String> {
    let (word, colour) = mark(l.level);
    let mut rows = Vec::new();
    for (n, part) in wrap(&l.text, text_width).iter().enumerate() {
        if n == 0 {
            let text = if l.level == Level::Fault {
                paint(colour_on, "1", part)
            } else {
                part.clone()
            };
            rows.push(format!(
                " {}  {:<TOPIC_WIDTH$}{text}",
                paint(colour_on, colour, word),
                l.topic
            ));
        } else {
            rows.push(format!("       {:<TOPIC_WIDTH$}{part}", ""));
        }
    }
    if let Some(next) = &l.next_step {
        for (n, part) in wrap(next, text_width.saturating_sub(2)).iter().enumerate() {
            let arrow = if n == 0 { "→ " } else { "  " };
            rows.push(format!(
                "       {:<TOPIC_WIDTH$}{}",
                "",
                paint(colour_on, colour, &format!("{arrow}{part}"))
            ));
        }
    }
    rows
}

/// The whole screen, as lines (without cursor control).
pub fn render(o: &Overview, s: Screen) -> Vec<String> {
    let width = s.width.max(40);
    let mut out = Vec::new();
    let code = o.code.as_deref().unwrap_or("(no device id yet)");
    let site = o.site.as_deref().unwrap_or("not set");
    let slot = o
        .slot
        .as_deref()
        .map(|x| format!(" slot {x}"))
        .unwrap_or_default();
    let clock = crate::view::utc(o.generated_unix);
    let head = format!("CAIRN BOX {code}   site {site}   cairn {}{slot}", o.version);
    let pad = width.saturating_sub(head.chars().count() + clock.len() + 4);
    out.push(paint(
        s.colour,
        "1",
        &format!("{head}{}{clock} UTC", " ".repeat(pad.max(1))),
    ));
    out.push("═".repeat(width));
    let (word, colour) = mark(o.verdict);
    let verdict = format!(" {word}  {} ", o.headline.to_uppercase());
    out.push(paint(
        s.colour,
        &format!("7;{colour}"),
        &format!(
            "{verdict}{}",
            " ".repeat(width.saturating_sub(verdict.chars().count()))
        ),
    ));
    out.push(String::new());
    let mut footer = Vec::new();
    if let Some(id) = &o.device_id {
        for (n, part) in wrap(id, width.saturating_sub(12)).iter().enumerate() {
            footer.push(format!(
                " {:<10}{part}",
                if n == 0 { "device id" } else { "" }
            ));
        }
    }
    if !o.page_urls.is_empty() {
        footer.push(format!(" {:<10}{}", "page", o.page_urls.join("  ")));
    }
    for part in wrap(
        "This screen only shows the box's state; nothing typed here changes it.",
        width.saturating_sub(2),
    ) {
        footer.push(format!(" {part}"));
    }
    let text_width = width.saturating_sub(TOPIC_WIDTH + 8);
    let blocks: Vec<(Level, Vec<String>)> = o
        .lines
        .iter()
        .map(|l| (l.level, line_rows(l, text_width, s.colour)))
        .collect();
    let rows: usize = blocks.iter().map(|(_, b)| b.len()).sum();
    // On a small screen (the large console font gives 64×24) the green lines fold into one, so every red
    // line and its next step still fit.
    let fold = s.height > 0 && out.len() + rows + 1 + footer.len() > s.height;
    let mut folded = Vec::new();
    for (level, block) in blocks {
        if fold && level == Level::Ok {
            folded.push(block);
            continue;
        }
        out.extend(block);
    }
    if !folded.is_empty() {
        let topics: Vec<&str> = o
            .lines
            .iter()
            .filter(|l| l.level == Level::Ok)
            .map(|l| l.topic.as_str())
            .collect();
        let (word, colour) = mark(Level::Ok);
        for (n, part) in wrap(&topics.join(", "), width.saturating_sub(8))
            .iter()
            .enumerate()
        {
            let mark = if n == 0 {
                paint(s.colour, colour, word)
            } else {
                "    ".into()
            };
            out.push(format!(" {mark}  {part}"));
        }
    }
    out.push(String::new());
    out.extend(footer);
    if let Some(payload) = qr_payload(o) {
        let qr = qr_lines(&payload);
        // The QR code goes below when it fits; the code and id are on screen in words either way.
        if !qr.is_empty() && out.len() + qr.len() + 1 < s.height {
            out.push(format!(" scan for the device id and code {code}:"));
            for row in &qr {
                out.push(format!(" {row}"));
            }
        }
    }
    out
}

/// What `--plain` prints the screen again on: a line changing colour or advice, the code or the headline;
/// not a counter ticking (records kept, seconds ago), which would flood a serial port.
pub fn plain_key(o: &Overview) -> String {
    let levels: Vec<_> = o
        .lines
        .iter()
        .map(|l| (&l.topic, l.level, &l.next_step))
        .collect();
    format!("{levels:?}{:?}{:?}", o.code, o.headline)
}

/// What the screen shows when the agent does not answer.
pub fn render_unreachable(reason: &str, now_unix: u64, s: Screen) -> Vec<String> {
    let width = s.width.max(40);
    let mut out = vec![
        paint(
            s.colour,
            "1",
            &format!("CAIRN BOX   {} UTC", crate::view::utc(now_unix)),
        ),
        "═".repeat(width),
        paint(
            s.colour,
            "7;1;31",
            &format!("{:<width$}", " FAIL  THE CAIRN AGENT IS NOT ANSWERING"),
        ),
        String::new(),
    ];
    for part in wrap(reason, width.saturating_sub(4)) {
        out.push(format!("  {part}"));
    }
    out.push(String::new());
    for part in wrap(
        "→ Next: wait two minutes, it restarts by itself; if this screen stays, switch the box off and on once; if it is still here, call ops.",
        width.saturating_sub(4),
    ) {
        out.push(format!("  {}", paint(s.colour, "1;31", &part)));
    }
    out
}

/// A full redraw for a live terminal: home, each line cleared to its end, the rest of the screen cleared.
pub fn frame(lines: &[String], height: usize) -> String {
    let mut f = String::from("\x1b[H");
    for l in lines.iter().take(height.max(1)) {
        let _ = write!(f, "{l}\x1b[K\r\n");
    }
    f.push_str("\x1b[J");
    f
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_proto::overview::Line;

    fn overview(level: Level) -> Overview {
        Overview {
            generated_unix: 0,
            device_id: Some("000b".to_owned() + &"ab".repeat(32)),
            code: Some("K7QF-2M9A".into()),
            site: Some("rack 3".into()),
            version: "1.0.0".into(),
            slot: Some("a".into()),
            verdict: level,
            headline: "1 problem needs attention: follow the red line".into(),
            lines: vec![Line {
                topic: "Network".into(),
                level,
                text: "no network link on port 1 (eno1)".into(),
                next_step: Some(
                    "check the cable: both ends firmly in, and the switch or router on".into(),
                ),
            }],
            page_urls: vec!["http://192.0.2.7/".into()],
            events: vec![],
        }
    }

    #[test]
    fn a_red_line_reads_in_words_with_its_next_step() {
        let lines = render(
            &overview(Level::Fault),
            Screen {
                width: 80,
                height: 60,
                colour: false,
            },
        );
        let text = lines.join("\n");
        assert!(
            text.contains("FAIL  Network     no network link on port 1 (eno1)"),
            "{text}"
        );
        assert!(text.contains("→ check the cable"), "{text}");
        assert!(
            text.contains("CAIRN BOX K7QF-2M9A   site rack 3   cairn 1.0.0 slot a"),
            "{text}"
        );
        assert!(text.contains("1 PROBLEM NEEDS ATTENTION"), "{text}");
        assert!(lines.iter().all(|l| l.chars().count() <= 80), "{text}");
        assert!(
            text.contains('▀') || text.contains('▄'),
            "the QR code is drawn when it fits"
        );
    }

    #[test]
    fn a_short_screen_leaves_out_the_qr_code_not_the_lines() {
        let lines = render(
            &overview(Level::Fault),
            Screen {
                width: 80,
                height: 20,
                colour: true,
            },
        );
        let text = lines.join("\n");
        assert!(!text.contains('▀'));
        assert!(text.contains("\x1b[1;31mFAIL\x1b[0m"), "{text}");
    }

    #[test]
    fn on_a_64_by_24_console_green_lines_fold_and_red_ones_stay_whole() {
        let mut o = overview(Level::Fault);
        o.lines.push(Line {
            topic: "GPUs".into(),
            level: Level::Fault,
            text: "GPU 3 (PCI 0000:13:00.0) failed: XID 79: the GPU has fallen off the bus".into(),
            next_step: Some(
                "the box keeps running its other GPUs; call ops to arrange a replacement".into(),
            ),
        });
        for topic in [
            "TPM",
            "Update",
            "GPUs",
            "SSDs",
            "Power",
            "Uplink",
            "Telemetry",
            "Workloads",
            "Attestation",
        ] {
            o.lines.push(Line {
                topic: topic.into(),
                level: Level::Ok,
                text: "fine".into(),
                next_step: None,
            });
        }
        let lines = render(
            &o,
            Screen {
                width: 64,
                height: 24,
                colour: false,
            },
        );
        let text = lines.join("\n");
        assert!(lines.len() <= 24, "{text}");
        assert!(
            text.contains("FAIL  Network     no network link on port 1"),
            "{text}"
        );
        assert!(text.contains("→ check the cable"), "{text}");
        assert!(text.contains(" OK   TPM, Update, GPUs"), "{text}");
        let tall = render(
            &o,
            Screen {
                width: 64,
                height: 80,
                colour: false,
            },
        )
        .join("\n");
        assert!(tall.contains(" OK   TPM         fine"), "{tall}");
    }

    #[test]
    fn plain_output_repeats_on_a_change_of_colour_or_advice_not_of_a_counter() {
        let a = overview(Level::Attention);
        let mut ticking = a.clone();
        ticking.lines[0].text = "1774 records kept on the box, oldest 9 s".into();
        ticking.generated_unix += 2;
        assert_eq!(plain_key(&a), plain_key(&ticking));
        let mut red = a.clone();
        red.lines[0].level = Level::Fault;
        assert_ne!(plain_key(&a), plain_key(&red));
        let mut advice = a.clone();
        advice.lines[0].next_step = Some("something else".into());
        assert_ne!(plain_key(&a), plain_key(&advice));
    }

    #[test]
    fn the_qr_code_is_a_square_of_half_blocks() {
        let rows = qr_lines("CAIRN:K7QF-2M9A:000BABAB");
        assert!(rows.len() >= 12);
        let w = rows[0].chars().count();
        assert!(rows.iter().all(|r| r.chars().count() == w));
        assert_eq!(w.div_ceil(2), rows.len());
    }

    #[test]
    fn wrap_keeps_words_and_cuts_only_what_cannot_fit() {
        assert_eq!(wrap("aaa bbb ccc", 10), vec!["aaa bbb", "ccc"]);
        assert_eq!(wrap(&"x".repeat(25), 10).len(), 3);
        assert_eq!(wrap("", 10), vec![""]);
    }
}
