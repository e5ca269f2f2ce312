//! A small reader and writer for NumPy `.npy` files (format versions 1–3).
//!
//! Written here rather than pulled from a crate because we need only little-endian `<f4` and
//! `<f2` arrays in C order, and we want every malformed file to produce an error that names the
//! problem (truncated data, Fortran order, float64) instead of a generic parse failure.

use anyhow::{bail, Context, Result};
use flexprefill_core::{bf16, f16, DType, HostTensor};

const MAGIC: &[u8] = b"\x93NUMPY";

/// An array read from a `.npy` file.
#[derive(Debug)]
pub struct NpyArray {
    /// Dimensions, C order.
    pub shape: Vec<usize>,
    /// Elements.
    pub data: HostTensor,
}

/// Parses the bytes of a `.npy` file.
pub fn parse(bytes: &[u8]) -> Result<NpyArray> {
    if bytes.len() < 10 || &bytes[..6] != MAGIC {
        bail!(
            "not a .npy file: it does not start with the \\x93NUMPY magic ({} bytes)",
            bytes.len()
        );
    }
    let major = bytes[6];
    let (header_len, header_start) = match major {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 => {
            if bytes.len() < 12 {
                bail!("truncated .npy header ({} bytes)", bytes.len());
            }
            (
                u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
                12,
            )
        }
        v => bail!("unsupported .npy format version {v}"),
    };
    let data_start = header_start + header_len;
    if bytes.len() < data_start {
        bail!(
            "truncated .npy header: it claims {header_len} bytes but the file has {}",
            bytes.len() - header_start
        );
    }
    let header = std::str::from_utf8(&bytes[header_start..data_start])
        .context("the .npy header is not valid text")?;
    let descr = dict_value(header, "descr")
        .context("the .npy header has no 'descr'")?
        .trim_matches(|c| c == '\'' || c == '"')
        .to_string();
    let fortran =
        dict_value(header, "fortran_order").context("the .npy header has no 'fortran_order'")?;
    if fortran.trim() != "False" {
        bail!("Fortran-order .npy arrays are not supported: save with np.ascontiguousarray(x)");
    }
    let shape_text = dict_value(header, "shape").context("the .npy header has no 'shape'")?;
    let shape = parse_shape(shape_text)?;
    let dtype = match descr.as_str() {
        "<f4" | "=f4" => DType::F32,
        "<f2" | "=f2" => DType::F16,
        other => bail!(
            "unsupported .npy dtype '{other}': use float32 ('<f4') or float16 ('<f2'); \
             for bf16 write a safetensors file"
        ),
    };
    let count = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .context("the .npy shape overflows")?;
    let elem = if dtype == DType::F32 { 4 } else { 2 };
    let want = count
        .checked_mul(elem)
        .with_context(|| format!("the .npy shape {shape:?} overflows the byte count"))?;
    let have = bytes.len() - data_start;
    if have < want {
        bail!("truncated .npy data: shape {shape:?} needs {want} bytes but the file holds {have}");
    }
    let raw = &bytes[data_start..data_start + want];
    Ok(NpyArray {
        shape,
        data: decode(raw, dtype),
    })
}

/// Decodes little-endian raw bytes of `dtype` (length already checked).
pub fn decode(raw: &[u8], dtype: DType) -> HostTensor {
    match dtype {
        DType::F32 => HostTensor::F32(
            raw.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        ),
        DType::F16 => HostTensor::F16(
            raw.chunks_exact(2)
                .map(|c| f16::from_bits(u16::from_le_bytes([c[0], c[1]])))
                .collect(),
        ),
        DType::BF16 => HostTensor::BF16(
            raw.chunks_exact(2)
                .map(|c| bf16::from_bits(u16::from_le_bytes([c[0], c[1]])))
                .collect(),
        ),
    }
}

/// Little-endian bytes of a tensor.
pub fn encode(t: &HostTensor) -> Vec<u8> {
    match t {
        HostTensor::F32(x) => x.iter().flat_map(|v| v.to_le_bytes()).collect(),
        HostTensor::F16(x) => x.iter().flat_map(|v| v.to_bits().to_le_bytes()).collect(),
        HostTensor::BF16(x) => x.iter().flat_map(|v| v.to_bits().to_le_bytes()).collect(),
    }
}

/// Writes a `.npy` (version 1.0) file. bf16 has no NumPy dtype, so it is refused.
pub fn to_bytes(shape: &[usize], t: &HostTensor) -> Result<Vec<u8>> {
    let descr = match t.dtype() {
        DType::F32 => "<f4",
        DType::F16 => "<f2",
        DType::BF16 => bail!("bf16 has no .npy dtype: write a .safetensors output instead"),
    };
    let dims = shape
        .iter()
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let shape_text = if shape.len() == 1 {
        format!("({dims},)")
    } else {
        format!("({dims})")
    };
    let mut header =
        format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape_text}, }}");
    // NumPy pads so that the data starts on a 64-byte boundary, header ending in '\n'.
    let unpadded = MAGIC.len() + 4 + header.len() + 1;
    header.push_str(&" ".repeat((64 - unpadded % 64) % 64));
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + t.len() * 4);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[1, 0]);
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(&encode(t));
    Ok(out)
}

/// The text after `'key':` up to the next top-level comma (tuples kept whole).
fn dict_value<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    let at = header
        .find(&format!("'{key}'"))
        .or_else(|| header.find(&format!("\"{key}\"")))?;
    let rest = &header[at + key.len() + 2..];
    let rest = rest.trim_start().strip_prefix(':')?.trim_start();
    let mut depth = 0;
    for (i, c) in rest.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth == 0 {
                    return Some(&rest[..=i]);
                }
            }
            ',' | '}' if depth == 0 => return Some(rest[..i].trim()),
            _ => {}
        }
    }
    None
}

fn parse_shape(text: &str) -> Result<Vec<usize>> {
    let inner = text
        .trim()
        .strip_prefix('(')
        .and_then(|t| t.strip_suffix(')'))
        .with_context(|| format!("the .npy shape {text} is not a tuple"))?;
    inner
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.trim_end_matches('L')
                .parse::<usize>()
                .with_context(|| format!("bad dimension '{s}' in the .npy shape {text}"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_f32_and_f16() {
        for t in [
            HostTensor::F32(vec![1.0, -2.5, 3.25, 0.0, 5.0, 6.0]),
            HostTensor::F16(
                [1.0f32, -2.5, 3.25, 0.0, 5.0, 6.0]
                    .map(f16::from_f32)
                    .to_vec(),
            ),
        ] {
            let bytes = to_bytes(&[1, 2, 3], &t).unwrap();
            assert_eq!(
                (bytes.len() - t.len() * if t.dtype() == DType::F32 { 4 } else { 2 }) % 64,
                0
            );
            let a = parse(&bytes).unwrap();
            assert_eq!(a.shape, vec![1, 2, 3]);
            assert_eq!(a.data, t);
        }
    }

    #[test]
    fn numpy_written_header_parses() {
        // Header exactly as numpy 1.26 writes it for np.zeros((2, 3), np.float32).
        let header = "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }";
        let mut h = header.to_string();
        h.push_str(&" ".repeat(118 - 1 - h.len()));
        h.push('\n');
        let mut bytes = MAGIC.to_vec();
        bytes.extend_from_slice(&[1, 0]);
        bytes.extend_from_slice(&(h.len() as u16).to_le_bytes());
        bytes.extend_from_slice(h.as_bytes());
        bytes.extend_from_slice(&[0u8; 24]);
        let a = parse(&bytes).unwrap();
        assert_eq!(a.shape, vec![2, 3]);
        assert_eq!(a.data.len(), 6);
    }

    #[test]
    fn bad_files_name_the_problem() {
        let good = to_bytes(&[4], &HostTensor::F32(vec![1.0; 4])).unwrap();
        let e = parse(&good[..good.len() - 3]).unwrap_err().to_string();
        assert!(e.contains("truncated"), "{e}");
        let e = parse(b"hello world").unwrap_err().to_string();
        assert!(e.contains("not a .npy"), "{e}");
        let replace = |from: &[u8], to: &[u8]| {
            let at = good.windows(from.len()).position(|w| w == from).unwrap();
            let mut b = good.clone();
            b[at..at + to.len()].copy_from_slice(to);
            b
        };
        let e = parse(&replace(b"<f4", b"<f8")).unwrap_err().to_string();
        assert!(e.contains("'<f8'"), "{e}");
        let e = parse(&replace(b"False", b"True ")).unwrap_err().to_string();
        assert!(e.contains("Fortran"), "{e}");
    }

    /// Found by the npy fuzz target (issue 15): a shape whose element count fits a usize but
    /// whose byte count does not overflowed `count * 4` (a panic in debug builds, a wrapped and
    /// too small byte count in release).
    #[test]
    fn issue15_shape_whose_byte_count_overflows_is_an_error() {
        let good = to_bytes(&[4], &HostTensor::F32(vec![1.0; 4])).unwrap();
        let at = good.windows(4).position(|w| w == b"(4,)").unwrap();
        let mut b = good[..at].to_vec();
        b.extend_from_slice(b"(9223372036854775808,)");
        b.extend_from_slice(&good[at + 4..]);
        let len = u16::from_le_bytes([good[8], good[9]]) + (b.len() - good.len()) as u16;
        b[8..10].copy_from_slice(&len.to_le_bytes());
        let e = parse(&b).unwrap_err().to_string();
        assert!(e.contains("overflows"), "{e}");
    }
}
