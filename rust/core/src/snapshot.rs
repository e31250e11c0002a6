//! Copying many source buffers into one destination, in parallel: a checkpoint snapshot (tensors laid
//! out exactly as in the files to be written) or a device load's pinned staging buffer. It is the only
//! host copy either makes, and the caller waits for it, so it runs on every core: one memcpy thread is
//! below what the memory bus can take.

use rayon::prelude::*;

use crate::error::{Error, Result};

/// Work unit: large sources are split so that one big tensor still uses every thread.
const CHUNK: usize = 1 << 20;
/// Below this, handing work to other threads costs more than it saves.
const PARALLEL_MIN_BYTES: usize = 8 << 20;

/// One source: `data` goes to `dest[offset..offset + data.len()]`. `name` is used in errors.
#[derive(Debug, Clone, Copy)]
pub struct Piece<'a> {
    pub name: &'a str,
    pub offset: usize,
    pub data: &'a [u8],
}

/// Copy every piece into `dest`. Pieces must lie inside `dest` and must not overlap each other.
pub fn gather(dest: &mut [u8], pieces: &[Piece<'_>]) -> Result<()> {
    check(dest.len(), pieces)?;
    let total: usize = pieces.iter().map(|p| p.data.len()).sum();
    // Every (dest range, source) pair is disjoint (checked above); split them into chunk-sized jobs.
    let base = dest.as_mut_ptr() as usize;
    let jobs: Vec<(usize, &[u8])> = pieces
        .iter()
        .flat_map(|p| {
            p.data
                .chunks(CHUNK)
                .enumerate()
                .map(move |(k, c)| (p.offset + k * CHUNK, c))
        })
        .collect();
    let copy = |&(offset, src): &(usize, &[u8])| {
        // SAFETY: `check` proved offset + len <= dest.len() and that no two pieces overlap, so the
        // jobs write disjoint ranges of `dest`, which we borrow mutably for the whole call.
        unsafe {
            std::ptr::copy_nonoverlapping(src.as_ptr(), (base as *mut u8).add(offset), src.len())
        }
    };
    if total < PARALLEL_MIN_BYTES {
        jobs.iter().for_each(copy);
    } else {
        jobs.par_iter().for_each(copy);
    }
    Ok(())
}

fn check(len: usize, pieces: &[Piece<'_>]) -> Result<()> {
    let mut ranges: Vec<(usize, usize, &str)> = Vec::with_capacity(pieces.len());
    for p in pieces {
        let end = p.offset.checked_add(p.data.len()).filter(|&e| e <= len);
        let Some(end) = end else {
            return Err(Error::tensor(
                p.name,
                format!(
                    "bytes {}+{} are outside the destination ({len} bytes)",
                    p.offset,
                    p.data.len()
                ),
            ));
        };
        if end > p.offset {
            ranges.push((p.offset, end, p.name));
        }
    }
    ranges.sort_unstable();
    for w in ranges.windows(2) {
        if w[1].0 < w[0].1 {
            return Err(Error::tensor(
                w[1].2,
                format!("overlaps `{}` in the destination", w[0].2),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_every_piece_to_its_offset() {
        let big: Vec<u8> = (0..(9 << 20)).map(|i| (i % 251) as u8).collect();
        let small = b"hello".to_vec();
        let mut dest = vec![0u8; 16 + big.len() + 5];
        let pieces = [
            Piece {
                name: "small",
                offset: 3,
                data: &small,
            },
            Piece {
                name: "big",
                offset: 16,
                data: &big,
            },
            Piece {
                name: "empty",
                offset: dest.len(),
                data: &[],
            },
        ];
        gather(&mut dest, &pieces).unwrap();
        assert_eq!(&dest[3..8], b"hello");
        assert_eq!(&dest[16..16 + big.len()], &big[..]);
        assert_eq!(&dest[..3], &[0, 0, 0]);
    }

    #[test]
    fn out_of_bounds_and_overlaps_are_refused_before_copying() {
        let mut dest = vec![0u8; 8];
        let err = gather(
            &mut dest,
            &[Piece {
                name: "t",
                offset: 5,
                data: b"abcd",
            }],
        )
        .unwrap_err();
        assert!(err.to_string().contains("`t`"), "{err}");
        let err = gather(
            &mut dest,
            &[
                Piece {
                    name: "a",
                    offset: 0,
                    data: b"abcd",
                },
                Piece {
                    name: "b",
                    offset: 3,
                    data: b"xy",
                },
            ],
        )
        .unwrap_err();
        assert!(err.to_string().contains("overlaps `a`"), "{err}");
        assert_eq!(dest, vec![0u8; 8]);
        let huge = gather(
            &mut dest,
            &[Piece {
                name: "o",
                offset: usize::MAX,
                data: b"a",
            }],
        );
        assert!(huge.is_err());
    }
}
