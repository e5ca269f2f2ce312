//! A tiny RGB raster with anti-aliased text, written to PNG.
//!
//! The pictures are a few rectangles and labels, so a plotting library would be mostly unused
//! weight; what matters is text that renders the same on every machine. The font (DejaVu Sans)
//! is embedded by the `dejavu` crate and rasterised by `ab_glyph`: no system font, no
//! fontconfig, identical output on a bare CI container.

use std::path::Path;
use std::sync::OnceLock;

use ab_glyph::{point, Font, FontRef, PxScale, ScaleFont};
use anyhow::{Context, Result};

/// An sRGB colour.
pub type Rgb = [u8; 3];

/// White.
pub const WHITE: Rgb = [255, 255, 255];
/// Near-black for text.
pub const INK: Rgb = [30, 30, 30];
/// Grey for secondary text and frames.
pub const GREY: Rgb = [110, 110, 110];

/// Where a text's anchor point sits horizontally.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Align {
    /// Anchor at the left edge.
    Left,
    /// Anchor at the centre.
    Center,
    /// Anchor at the right edge.
    Right,
}

fn font() -> &'static FontRef<'static> {
    static FONT: OnceLock<FontRef<'static>> = OnceLock::new();
    FONT.get_or_init(|| {
        FontRef::try_from_slice(dejavu::sans::regular())
            .expect("DejaVu Sans embedded by the dejavu crate is a valid TrueType font")
    })
}

/// Width in pixels of `text` at `size` px.
pub fn text_width(text: &str, size: f32) -> f32 {
    let f = font().as_scaled(PxScale::from(size));
    let mut w = 0.0;
    let mut prev = None;
    for c in text.chars() {
        let id = f.glyph_id(c);
        if let Some(p) = prev {
            w += f.kern(p, id);
        }
        w += f.h_advance(id);
        prev = Some(id);
    }
    w
}

/// Linear interpolation between two colours, `t` in [0, 1].
pub fn lerp(a: Rgb, b: Rgb, t: f64) -> Rgb {
    let t = t.clamp(0.0, 1.0);
    [0, 1, 2].map(|i| (a[i] as f64 + (b[i] as f64 - a[i] as f64) * t).round() as u8)
}

/// An RGB image being drawn.
pub struct Canvas {
    width: usize,
    height: usize,
    px: Vec<Rgb>,
}

impl Canvas {
    /// A `width × height` canvas filled with white.
    pub fn new(width: usize, height: usize) -> Self {
        Self {
            width,
            height,
            px: vec![WHITE; width * height],
        }
    }

    /// Pixel at (x, y).
    pub fn get(&self, x: usize, y: usize) -> Rgb {
        self.px[y * self.width + x]
    }

    fn blend(&mut self, x: i64, y: i64, c: Rgb, alpha: f32) {
        if x < 0 || y < 0 || x >= self.width as i64 || y >= self.height as i64 || alpha <= 0.0 {
            return;
        }
        let p = &mut self.px[y as usize * self.width + x as usize];
        *p = lerp(*p, c, alpha.min(1.0) as f64);
    }

    /// Fills a rectangle (clipped to the canvas).
    pub fn fill_rect(&mut self, x: usize, y: usize, w: usize, h: usize, c: Rgb) {
        let (x1, y1) = ((x + w).min(self.width), (y + h).min(self.height));
        for yy in y.min(self.height)..y1 {
            let row = yy * self.width;
            self.px[row + x.min(x1)..row + x1].fill(c);
        }
    }

    /// A one-pixel rectangle outline around (x, y, w, h).
    pub fn outline(&mut self, x: usize, y: usize, w: usize, h: usize, c: Rgb) {
        self.fill_rect(x, y, w, 1, c);
        self.fill_rect(x, y + h.saturating_sub(1), w, 1, c);
        self.fill_rect(x, y, 1, h, c);
        self.fill_rect(x + w.saturating_sub(1), y, 1, h, c);
    }

    /// Draws `text` with its top at `y` and its anchor at `x`; returns its width.
    pub fn text(&mut self, x: f32, y: f32, size: f32, c: Rgb, align: Align, text: &str) -> f32 {
        let w = text_width(text, size);
        let x0 = match align {
            Align::Left => x,
            Align::Center => x - w / 2.0,
            Align::Right => x - w,
        };
        let f = font().as_scaled(PxScale::from(size));
        let baseline = y + f.ascent();
        let mut pen = x0;
        let mut prev = None;
        for ch in text.chars() {
            let id = f.glyph_id(ch);
            if let Some(p) = prev {
                pen += f.kern(p, id);
            }
            let glyph = id.with_scale_and_position(size, point(pen, baseline));
            pen += f.h_advance(id);
            prev = Some(id);
            if let Some(og) = font().outline_glyph(glyph) {
                let b = og.px_bounds();
                og.draw(|gx, gy, a| {
                    self.blend(b.min.x as i64 + gx as i64, b.min.y as i64 + gy as i64, c, a)
                });
            }
        }
        w
    }

    /// Draws `text` rotated 90° counter-clockwise (reading bottom to top), centred on
    /// (`cx`, `cy`); for vertical axis titles.
    pub fn text_vertical(&mut self, cx: f32, cy: f32, size: f32, c: Rgb, text: &str) {
        let w = text_width(text, size).ceil() as usize + 2;
        let h = (size * 1.3).ceil() as usize;
        let mut tmp = Canvas::new(w, h);
        tmp.text(1.0, 0.0, size, [0, 0, 0], Align::Left, text);
        let (x0, y0) = (cx as i64 - h as i64 / 2, cy as i64 - w as i64 / 2);
        for ty in 0..h {
            for tx in 0..w {
                let a = 1.0 - tmp.get(tx, ty)[0] as f32 / 255.0;
                // (tx, ty) → (ty, w-1-tx): rotate counter-clockwise.
                self.blend(x0 + ty as i64, y0 + (w - 1 - tx) as i64, c, a);
            }
        }
    }

    /// Encodes to PNG (8-bit RGB).
    pub fn to_png(&self) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        {
            let mut enc = png::Encoder::new(&mut out, self.width as u32, self.height as u32);
            enc.set_color(png::ColorType::Rgb);
            enc.set_depth(png::BitDepth::Eight);
            let mut w = enc.write_header().context("cannot encode PNG header")?;
            let data: Vec<u8> = self.px.iter().flatten().copied().collect();
            w.write_image_data(&data)
                .context("cannot encode PNG data")?;
        }
        Ok(out)
    }

    /// Writes a PNG file.
    pub fn save(&self, path: &Path) -> Result<()> {
        std::fs::write(path, self.to_png()?)
            .with_context(|| format!("cannot write {}", path.display()))
    }
}
