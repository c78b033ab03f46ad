//! The canvas filling in, redrawn in place on a terminal after every step.

use std::io::{IsTerminal, Write};

/// What a mask looks like on screen.
pub const MASK_GLYPH: char = '░';

pub struct LiveCanvas {
    /// Screen lines the last frame took.
    lines: usize,
    out: std::io::Stdout,
}

impl LiveCanvas {
    /// A live view, or `None` when stdout is not a terminal.
    pub fn new() -> Option<Self> {
        let out = std::io::stdout();
        out.is_terminal().then_some(LiveCanvas { lines: 0, out })
    }

    pub fn draw(&mut self, frame: &str) {
        let width = terminal_size::terminal_size()
            .map(|(w, _)| w.0 as usize)
            .unwrap_or(80)
            .max(1);
        let mut out = self.out.lock();
        self.clear(&mut out);
        let _ = write!(out, "{frame}");
        let _ = out.flush();
        self.lines = frame
            .split('\n')
            .map(|l| l.chars().count().div_ceil(width).max(1))
            .sum();
    }

    fn clear(&self, out: &mut impl Write) {
        if self.lines > 1 {
            let _ = write!(out, "\x1b[{}A", self.lines - 1);
        }
        let _ = write!(out, "\r\x1b[J");
    }

    /// Removes the last frame, leaving the cursor where it started.
    pub fn finish(self) {
        let mut out = self.out.lock();
        self.clear(&mut out);
        let _ = out.flush();
    }
}

/// Decodes a canvas: runs of committed tokens as text, masks as glyphs.
pub fn render(ids: &[u32], mask: u32, decode: impl Fn(&[u32]) -> String) -> String {
    let mut s = String::new();
    let mut run_start = 0;
    for (i, &t) in ids.iter().enumerate() {
        if t == mask {
            s.push_str(&decode(&ids[run_start..i]));
            s.push(MASK_GLYPH);
            run_start = i + 1;
        }
    }
    s.push_str(&decode(&ids[run_start..]));
    s
}
