//! The pictures of `--mask-png`: the selected block mask of each head (the paper's Figure 9)
//! and the density of every (batch, head) as one heatmap (Figure 10).

mod canvas;

pub use canvas::{Align, Canvas, Rgb, GREY, INK, WHITE};

use canvas::lerp;

/// Computed block.
pub const SELECTED: Rgb = [31, 78, 156];
/// Causal block that was skipped.
pub const SKIPPED: Rgb = [224, 229, 236];
/// Key block in the future of every query of the row (never computed, not counted).
pub const FUTURE: Rgb = WHITE;
/// Query block whose worst row kept at least gamma.
pub const MASS_OK: Rgb = [96, 170, 110];
/// Query block with a row below gamma.
pub const MASS_LOW: Rgb = [214, 80, 60];

/// Largest plot side in pixels before blocks are merged into one pixel.
const MAX_PLOT: usize = 720;

/// Viridis, sampled at 9 points (matplotlib's table), interpolated linearly.
pub fn viridis(t: f64) -> Rgb {
    const STOPS: [Rgb; 9] = [
        [68, 1, 84],
        [71, 44, 122],
        [59, 81, 139],
        [44, 113, 142],
        [33, 144, 141],
        [39, 173, 129],
        [92, 200, 99],
        [170, 220, 50],
        [253, 231, 37],
    ];
    let x = t.clamp(0.0, 1.0) * (STOPS.len() - 1) as f64;
    let i = (x.floor() as usize).min(STOPS.len() - 2);
    lerp(STOPS[i], STOPS[i + 1], x - i as f64)
}

/// Density colour: dark for dense heads, light for sparse ones (as the paper's Figure 10).
pub fn density_colour(d: f64) -> Rgb {
    viridis(1.0 - d)
}

/// Black or white, whichever reads better on `bg`.
fn ink_on(bg: Rgb) -> Rgb {
    let l = 0.299 * bg[0] as f64 + 0.587 * bg[1] as f64 + 0.114 * bg[2] as f64;
    if l > 140.0 {
        INK
    } else {
        WHITE
    }
}

/// A tick step from 1, 2, 5 × 10^k giving at most `max_ticks` ticks over `n` items.
pub fn tick_step(n: usize, max_ticks: usize) -> usize {
    let mut base = 1;
    loop {
        for m in [1, 2, 5] {
            let s = base * m;
            if n.div_ceil(s) <= max_ticks {
                return s;
            }
        }
        base *= 10;
    }
}

/// What `mask_figure` draws.
pub struct MaskFigure<'a> {
    /// First line.
    pub title: String,
    /// Second line (numbers).
    pub subtitle: String,
    /// Query blocks (rows).
    pub num_query_blocks: usize,
    /// Key blocks (columns).
    pub num_key_blocks: usize,
    /// Tokens per block (for the axis title).
    pub block_size: usize,
    /// `[nqb · nkb]` row-major: true where the block is computed.
    pub selected: &'a [bool],
    /// Key blocks query block `r` may see (`0..causal[r]`).
    pub causal: &'a [usize],
    /// Per query block, the smallest captured mass of its rows, with gamma (from
    /// --compare-dense): drawn as a strip right of the mask.
    pub row_block_mass: Option<(&'a [f32], f32)>,
}

/// The selected block mask of one head: query blocks down, key blocks across.
pub fn mask_figure(f: &MaskFigure<'_>) -> Canvas {
    let (nqb, nkb) = (f.num_query_blocks.max(1), f.num_key_blocks.max(1));
    // Merge k×k blocks into one display cell when the mask is too big for the picture; a
    // merged cell's shade is the share of its causal blocks that are computed.
    let k = nqb.max(nkb).div_ceil(MAX_PLOT);
    let (gq, gk) = (nqb.div_ceil(k), nkb.div_ceil(k));
    let cell = (MAX_PLOT / gq.max(gk)).clamp(1, 24);
    let (plot_w, plot_h) = (gk * cell, gq * cell);
    let strip = f.row_block_mass.is_some();
    let (left, top, bottom) = (84, 78, 112);
    let right = if strip { 80 } else { 36 };
    let width = (left + plot_w + right).max(640);
    let height = top + plot_h.max(120) + bottom;
    let mut cv = Canvas::new(width, height);

    cv.text(16.0, 12.0, 19.0, INK, Align::Left, &f.title);
    cv.text(16.0, 40.0, 13.0, GREY, Align::Left, &f.subtitle);

    for gr in 0..gq {
        for gc in 0..gk {
            let (mut sel, mut causal) = (0usize, 0usize);
            for r in gr * k..((gr + 1) * k).min(nqb) {
                for c in gc * k..((gc + 1) * k).min(nkb) {
                    if c < f.causal.get(r).copied().unwrap_or(0) {
                        causal += 1;
                        sel += f.selected.get(r * nkb + c).copied().unwrap_or(false) as usize;
                    }
                }
            }
            let colour = if causal == 0 {
                FUTURE
            } else {
                lerp(SKIPPED, SELECTED, sel as f64 / causal as f64)
            };
            cv.fill_rect(left + gc * cell, top + gr * cell, cell, cell, colour);
        }
    }
    cv.outline(left - 1, top - 1, plot_w + 2, plot_h + 2, GREY);

    // Ticks at block centres, labelled with block numbers.
    let xs = tick_step(nkb, (plot_w / 48).max(2));
    for b in (0..nkb).step_by(xs) {
        let x = left + (b / k) * cell + cell / 2;
        cv.fill_rect(x, top + plot_h + 1, 1, 5, GREY);
        cv.text(
            x as f32,
            (top + plot_h + 7) as f32,
            11.0,
            INK,
            Align::Center,
            &b.to_string(),
        );
    }
    let ys = tick_step(nqb, (plot_h / 24).max(2));
    for b in (0..nqb).step_by(ys) {
        let y = top + (b / k) * cell + cell / 2;
        cv.fill_rect(left - 6, y, 5, 1, GREY);
        cv.text(
            (left - 9) as f32,
            y as f32 - 7.0,
            11.0,
            INK,
            Align::Right,
            &b.to_string(),
        );
    }
    cv.text(
        (left + plot_w / 2) as f32,
        (top + plot_h + 24) as f32,
        13.0,
        INK,
        Align::Center,
        &format!("key block ({} tokens each) →", f.block_size),
    );
    cv.text_vertical(
        22.0,
        (top + plot_h / 2) as f32,
        13.0,
        INK,
        "← query block (later queries lower)",
    );
    if k > 1 {
        cv.text(
            (left + plot_w / 2) as f32,
            (top - 20) as f32,
            12.0,
            GREY,
            Align::Center,
            &format!("each cell merges {k}×{k} blocks: shade = share computed"),
        );
    }

    if let Some((mass, gamma)) = f.row_block_mass {
        let sx = left + plot_w + 14;
        for gr in 0..gq {
            let worst = (gr * k..((gr + 1) * k).min(nqb))
                .filter_map(|r| mass.get(r).copied())
                .fold(f32::INFINITY, f32::min);
            let c = if !worst.is_finite() {
                WHITE
            } else if worst < gamma - crate::compare::MASS_TOLERANCE as f32 {
                MASS_LOW
            } else {
                MASS_OK
            };
            cv.fill_rect(sx, top + gr * cell, 14, cell, c);
        }
        cv.outline(sx - 1, top - 1, 16, plot_h + 2, GREY);
        cv.text(
            (sx + 7) as f32,
            (top - 20) as f32,
            11.0,
            GREY,
            Align::Center,
            "row mass",
        );
    }

    // Legend.
    let ly = (top + plot_h.max(120) + 52) as f32;
    let mut x = 16.0f32;
    let mut entries = vec![
        (SELECTED, "computed".to_string()),
        (SKIPPED, "causal, skipped".to_string()),
        (FUTURE, "future keys (masked)".to_string()),
    ];
    if let Some((_, gamma)) = f.row_block_mass {
        entries.push((MASS_OK, format!("all rows ≥ γ={gamma}")));
        entries.push((MASS_LOW, format!("a row < γ={gamma}")));
    }
    for (c, label) in entries {
        cv.fill_rect(x as usize, ly as usize, 14, 14, c);
        cv.outline(x as usize, ly as usize, 14, 14, GREY);
        let w = cv.text(x + 20.0, ly - 1.0, 12.0, INK, Align::Left, &label);
        x += 20.0 + w + 18.0;
    }
    cv
}

/// What `density_heatmap` draws.
pub struct HeatmapFigure<'a> {
    /// First line.
    pub title: String,
    /// Second line.
    pub subtitle: String,
    /// Rows (sequences of the batch, or layers).
    pub rows: usize,
    /// Columns (query heads).
    pub cols: usize,
    /// Row axis name (`batch`).
    pub row_label: &'a str,
    /// `[rows · cols]` densities in [0, 1].
    pub density: &'a [f64],
    /// `[rows · cols]` short pattern labels (`VS`, `QA`, `D`), drawn under the number.
    pub pattern: &'a [&'a str],
}

/// Density of every (row, head) as colours with the numbers printed inside.
pub fn density_heatmap(f: &HeatmapFigure<'_>) -> Canvas {
    let (rows, cols) = (f.rows.max(1), f.cols.max(1));
    let cw = (720 / cols).clamp(14, 64);
    let ch = cw.clamp(40, 56);
    let (plot_w, plot_h) = (cols * cw, rows * ch);
    let (left, top, bottom) = (84, 100, 116);
    let width = (left + plot_w + 36).max(560);
    let height = top + plot_h + bottom;
    let mut cv = Canvas::new(width, height);
    cv.text(16.0, 12.0, 19.0, INK, Align::Left, &f.title);
    cv.text(16.0, 40.0, 13.0, GREY, Align::Left, &f.subtitle);

    let labels = cw >= 30;
    for r in 0..rows {
        for c in 0..cols {
            let d = f.density.get(r * cols + c).copied().unwrap_or(f64::NAN);
            let bg = if d.is_finite() {
                density_colour(d)
            } else {
                WHITE
            };
            let (x, y) = (left + c * cw, top + r * ch);
            cv.fill_rect(x, y, cw, ch, bg);
            cv.outline(x, y, cw + 1, ch + 1, WHITE);
            if labels && d.is_finite() {
                let ink = ink_on(bg);
                let pct = 100.0 * d;
                let txt = if pct < 9.95 {
                    format!("{pct:.1}")
                } else {
                    format!("{pct:.0}")
                };
                cv.text(
                    (x + cw / 2) as f32,
                    (y + 5) as f32,
                    13.0,
                    ink,
                    Align::Center,
                    &txt,
                );
                if let Some(p) = f.pattern.get(r * cols + c) {
                    cv.text(
                        (x + cw / 2) as f32,
                        (y + 23) as f32,
                        11.0,
                        ink,
                        Align::Center,
                        p,
                    );
                }
            }
        }
    }
    cv.outline(left - 1, top - 1, plot_w + 2, plot_h + 2, GREY);
    let xs = tick_step(cols, (plot_w / 28).max(2));
    for h in (0..cols).step_by(xs) {
        let x = left + h * cw + cw / 2;
        cv.text(
            x as f32,
            (top - 18) as f32,
            11.0,
            INK,
            Align::Center,
            &h.to_string(),
        );
    }
    cv.text(
        (left + plot_w / 2) as f32,
        (top - 34) as f32,
        12.0,
        INK,
        Align::Center,
        "query head →",
    );
    let ys = tick_step(rows, (plot_h / 20).max(2));
    for r in (0..rows).step_by(ys) {
        let y = top + r * ch + ch / 2;
        cv.text(
            (left - 8) as f32,
            y as f32 - 7.0,
            11.0,
            INK,
            Align::Right,
            &r.to_string(),
        );
    }
    cv.text_vertical(22.0, (top + plot_h / 2) as f32, 13.0, INK, f.row_label);

    // Colour bar.
    let (bx, by, bw, bh) = (left, top + plot_h + 34, 300usize, 14usize);
    for i in 0..bw {
        cv.fill_rect(
            bx + i,
            by,
            1,
            bh,
            density_colour(i as f64 / (bw - 1) as f64),
        );
    }
    cv.outline(bx - 1, by - 1, bw + 2, bh + 2, GREY);
    for t in 0..=4 {
        let x = bx + t * (bw - 1) / 4;
        cv.fill_rect(x, by + bh, 1, 4, GREY);
        cv.text(
            x as f32,
            (by + bh + 5) as f32,
            11.0,
            INK,
            Align::Center,
            &format!("{}%", 25 * t),
        );
    }
    cv.text(
        (bx + bw + 14) as f32,
        by as f32 - 1.0,
        12.0,
        INK,
        Align::Left,
        "density = computed / causal blocks",
    );
    if labels {
        cv.text(
            bx as f32,
            (by + bh + 24) as f32,
            11.0,
            GREY,
            Align::Left,
            "cell: density in %, pattern (VS vertical-slash, QA query-aware, D dense)",
        );
    }
    cv
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round() {
        assert_eq!(tick_step(5, 10), 1);
        assert_eq!(tick_step(32, 8), 5);
        assert_eq!(tick_step(128, 8), 20);
        assert_eq!(tick_step(1000, 10), 100);
    }

    #[test]
    fn mask_figure_draws_selected_cells() {
        // 4×4 causal mask, diagonal and sink selected.
        let n = 4;
        let mut sel = vec![false; n * n];
        for r in 0..n {
            sel[r * n] = true;
            sel[r * n + r] = true;
        }
        let causal: Vec<usize> = (1..=n).collect();
        let cv = mask_figure(&MaskFigure {
            title: "t".into(),
            subtitle: "s".into(),
            num_query_blocks: n,
            num_key_blocks: n,
            block_size: 128,
            selected: &sel,
            causal: &causal,
            row_block_mass: None,
        });
        // cell size 24 px: (row 3, col 0) selected, (row 3, col 1) skipped, (row 0, col 3) future.
        let at = |r: usize, c: usize| cv.get(84 + c * 24 + 12, 78 + r * 24 + 12);
        assert_eq!(at(3, 0), SELECTED);
        assert_eq!(at(3, 1), SKIPPED);
        assert_eq!(at(0, 3), FUTURE);
        assert!(cv.to_png().unwrap().starts_with(b"\x89PNG"));
    }

    #[test]
    fn text_leaves_ink() {
        let mut cv = Canvas::new(100, 30);
        let w = cv.text(2.0, 2.0, 16.0, INK, Align::Left, "gamma 0.9");
        assert!(w > 40.0);
        let dark = (0..30)
            .flat_map(|y| (0..100).map(move |x| (x, y)))
            .filter(|&(x, y)| cv.get(x, y)[0] < 128)
            .count();
        assert!(dark > 30, "{dark}");
    }
}
