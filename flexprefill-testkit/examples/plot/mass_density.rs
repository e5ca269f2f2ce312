//! Captured mass against density, one panel per selection mode, one curve per workload and
//! length (points ordered by gamma), drawn to PNG with an embedded font (no system fonts).

use ab_glyph::{point, Font, FontRef, PxScale, ScaleFont};

use super::Row;

pub type Rgb = [u8; 3];

pub struct Canvas {
    w: usize,
    h: usize,
    px: Vec<u8>,
    font: FontRef<'static>,
}

impl Canvas {
    pub fn new(w: usize, h: usize) -> Self {
        Self {
            w,
            h,
            px: vec![255; w * h * 3],
            font: FontRef::try_from_slice(dejavu::sans::regular())
                .expect("the dejavu crate embeds a valid TrueType font"),
        }
    }

    fn blend(&mut self, x: i64, y: i64, c: Rgb, a: f32) {
        if x < 0 || y < 0 || x >= self.w as i64 || y >= self.h as i64 || a <= 0.0 {
            return;
        }
        let i = (y as usize * self.w + x as usize) * 3;
        let a = a.min(1.0);
        for (px, &ck) in self.px[i..i + 3].iter_mut().zip(&c) {
            let old = *px as f32;
            *px = (old + (ck as f32 - old) * a).round() as u8;
        }
    }

    /// Anti-aliased segment of width `lw` (distance-to-segment coverage).
    pub fn line(
        &mut self,
        (x0, y0): (f32, f32),
        (x1, y1): (f32, f32),
        lw: f32,
        c: Rgb,
        dash: bool,
    ) {
        let (dx, dy) = (x1 - x0, y1 - y0);
        let len2 = (dx * dx + dy * dy).max(1e-6);
        let r = lw / 2.0 + 1.0;
        let (xa, xb) = ((x0.min(x1) - r) as i64, (x0.max(x1) + r) as i64);
        let (ya, yb) = ((y0.min(y1) - r) as i64, (y0.max(y1) + r) as i64);
        for y in ya..=yb {
            for x in xa..=xb {
                let (px, py) = (x as f32 + 0.5, y as f32 + 0.5);
                let t = (((px - x0) * dx + (py - y0) * dy) / len2).clamp(0.0, 1.0);
                if dash && ((t * len2.sqrt()) / 6.0) as i64 % 2 == 1 {
                    continue;
                }
                let (cx, cy) = (x0 + t * dx, y0 + t * dy);
                let d = ((px - cx).powi(2) + (py - cy).powi(2)).sqrt();
                self.blend(x, y, c, lw / 2.0 + 0.5 - d);
            }
        }
    }

    pub fn dot(&mut self, (x, y): (f32, f32), rad: f32, c: Rgb, hollow: bool) {
        let r = rad as i64 + 2;
        for yy in (y as i64 - r)..=(y as i64 + r) {
            for xx in (x as i64 - r)..=(x as i64 + r) {
                let d = ((xx as f32 + 0.5 - x).powi(2) + (yy as f32 + 0.5 - y).powi(2)).sqrt();
                let a = if hollow {
                    1.0 - (d - rad + 0.75).abs()
                } else {
                    rad + 0.5 - d
                };
                self.blend(xx, yy, c, a);
            }
        }
    }

    pub fn text(&mut self, s: &str, x: f32, y: f32, size: f32, c: Rgb, center: bool) {
        let font = self.font.clone();
        let f = font.as_scaled(PxScale::from(size));
        let width: f32 = s.chars().map(|ch| f.h_advance(f.glyph_id(ch))).sum();
        let mut pen = if center { x - width / 2.0 } else { x };
        for ch in s.chars() {
            let id = f.glyph_id(ch);
            let g = id.with_scale_and_position(PxScale::from(size), point(pen, y + f.ascent()));
            pen += f.h_advance(id);
            if let Some(o) = font.outline_glyph(g) {
                let b = o.px_bounds();
                o.draw(|gx, gy, cov| {
                    self.blend(
                        b.min.x as i64 + gx as i64,
                        b.min.y as i64 + gy as i64,
                        c,
                        cov,
                    )
                });
            }
        }
    }

    pub fn save(&self, path: &str) -> Result<(), Box<dyn std::error::Error>> {
        let file = std::io::BufWriter::new(std::fs::File::create(path)?);
        let mut enc = png::Encoder::new(file, self.w as u32, self.h as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        enc.write_header()?.write_image_data(&self.px)?;
        Ok(())
    }
}

pub const COLOURS: [Rgb; 6] = [
    [31, 119, 180],
    [255, 127, 14],
    [44, 160, 44],
    [214, 39, 40],
    [148, 103, 189],
    [140, 86, 75],
];
pub const INK: Rgb = [30, 30, 30];
pub const GRID: Rgb = [225, 225, 225];

/// Draws one panel per mode in `rows`: x = density, y = mean captured mass over all rows.
pub fn draw(rows: &[Row], path: &str) -> Result<(), Box<dyn std::error::Error>> {
    let mut modes: Vec<&str> = rows.iter().map(|r| r.mode).collect();
    modes.dedup();
    modes.sort_unstable();
    modes.dedup();
    let mut kinds: Vec<&str> = Vec::new();
    for r in rows {
        if !kinds.contains(&r.kind.as_str()) {
            kinds.push(&r.kind);
        }
    }
    let mut lens: Vec<usize> = rows.iter().map(|r| r.len).collect();
    lens.sort_unstable();
    lens.dedup();
    let y_min = rows
        .iter()
        .map(|r| r.mean_mass)
        .fold(1.0f64, f64::min)
        .min(0.8);
    let y_min = (y_min * 10.0).floor() / 10.0;
    let (pw, ph, margin) = (560.0f32, 440.0f32, 70.0f32);
    let legend_w = 170.0;
    let width = (modes.len() as f32 * (pw + margin) + margin + legend_w) as usize;
    let height = (ph + 2.0 * margin + 20.0) as usize;
    let mut cv = Canvas::new(width, height);
    cv.text(
        "FlexPrefill selection: captured attention mass vs density (points: gamma 0.8 → 0.98)",
        width as f32 / 2.0,
        10.0,
        18.0,
        INK,
        true,
    );
    for (pi, mode) in modes.iter().enumerate() {
        let ox = margin + pi as f32 * (pw + margin);
        let oy = margin + 10.0;
        let map = |d: f64, m: f64| {
            (
                ox + d as f32 * pw,
                oy + ph - ((m - y_min) / (1.0 - y_min)) as f32 * ph,
            )
        };
        for t in 0..=10 {
            let v = t as f64 / 10.0;
            let (gx, _) = map(v, y_min);
            cv.line((gx, oy), (gx, oy + ph), 1.0, GRID, false);
            cv.text(&format!("{v:.1}"), gx, oy + ph + 6.0, 13.0, INK, true);
        }
        // mass ticks on round steps: 0.05 for a narrow range, 0.1 otherwise
        let step = if 1.0 - y_min > 0.35 { 0.1 } else { 0.05 };
        let ticks = ((1.0 - y_min) / step).round() as usize;
        for t in 0..=ticks {
            let m = 1.0 - (ticks - t) as f64 * step;
            let (_, gy) = map(0.0, m);
            cv.line((ox, gy), (ox + pw, gy), 1.0, GRID, false);
            cv.text(&format!("{m:.2}"), ox - 40.0, gy - 8.0, 13.0, INK, false);
        }
        cv.line((ox, oy), (ox, oy + ph), 1.5, INK, false);
        cv.line((ox, oy + ph), (ox + pw, oy + ph), 1.5, INK, false);
        cv.text(mode, ox + pw / 2.0, oy - 26.0, 17.0, INK, true);
        cv.text(
            "density (selected / causal blocks)",
            ox + pw / 2.0,
            oy + ph + 26.0,
            14.0,
            INK,
            true,
        );
        cv.text("mean captured mass", ox - 62.0, oy - 26.0, 14.0, INK, false);
        for (ki, kind) in kinds.iter().enumerate() {
            for (li, &len) in lens.iter().enumerate() {
                let mut pts: Vec<&Row> = rows
                    .iter()
                    .filter(|r| r.mode == *mode && r.kind == *kind && r.len == len)
                    .collect();
                pts.sort_by(|a, b| a.gamma.total_cmp(&b.gamma));
                let c = COLOURS[ki % COLOURS.len()];
                for w in pts.windows(2) {
                    cv.line(
                        map(w[0].density, w[0].mean_mass),
                        map(w[1].density, w[1].mean_mass),
                        2.0,
                        c,
                        li > 0,
                    );
                }
                for p in pts {
                    cv.dot(map(p.density, p.mean_mass), 3.5, c, li > 0);
                }
            }
        }
    }
    let lx = margin + modes.len() as f32 * (pw + margin) - 20.0;
    let mut ly = margin + 20.0;
    for (ki, kind) in kinds.iter().enumerate() {
        let c = COLOURS[ki % COLOURS.len()];
        cv.line((lx, ly + 8.0), (lx + 26.0, ly + 8.0), 2.0, c, false);
        cv.dot((lx + 13.0, ly + 8.0), 3.5, c, false);
        cv.text(kind, lx + 34.0, ly, 14.0, INK, false);
        ly += 24.0;
    }
    for (li, len) in lens.iter().enumerate() {
        cv.line((lx, ly + 8.0), (lx + 26.0, ly + 8.0), 2.0, INK, li > 0);
        cv.dot((lx + 13.0, ly + 8.0), 3.5, INK, li > 0);
        cv.text(
            &format!("{}k tokens", len / 1024),
            lx + 34.0,
            ly,
            14.0,
            INK,
            false,
        );
        ly += 24.0;
    }
    cv.save(path)
}
