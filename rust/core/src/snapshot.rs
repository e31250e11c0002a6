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

/// Above this, stores bypass the cache (see [`stream_copy`]).
const STREAM_MIN_BYTES: usize = 16 << 20;

/// Copy with non-temporal (streaming) stores where the CPU has them. A snapshot is written once and
/// read back much later by the writer thread: regular stores would first read every destination line
/// into the cache (a third of the memory traffic) and evict the caller's working set. glibc's memcpy
/// does the same for single copies larger than the cache, but our copies are split into 1 MiB jobs
/// (and tensors are often smaller), each below its threshold.
///
/// # Safety
/// `src..src+len` must be readable, `dst..dst+len` writable, and the two must not overlap.
unsafe fn stream_copy(src: *const u8, dst: *mut u8, len: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_sfence, _mm_stream_si128};
        // Head: up to the first 16-byte aligned destination address, copied normally.
        let head = (dst.align_offset(16)).min(len);
        std::ptr::copy_nonoverlapping(src, dst, head);
        let body = (len - head) / 64 * 64;
        let mut i = head;
        while i < head + body {
            // SSE2 is part of x86_64: always available. Four 16-byte stores per 64-byte line.
            for k in (0..64).step_by(16) {
                let v = _mm_loadu_si128(src.add(i + k) as *const __m128i);
                _mm_stream_si128(dst.add(i + k) as *mut __m128i, v);
            }
            i += 64;
        }
        std::ptr::copy_nonoverlapping(src.add(i), dst.add(i), len - i);
        // Streaming stores are weakly ordered: make them visible before the copy counts as done.
        _mm_sfence();
    }
    #[cfg(not(target_arch = "x86_64"))]
    std::ptr::copy_nonoverlapping(src, dst, len);
}

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
    let streaming = total >= STREAM_MIN_BYTES;
    let copy = |&(offset, src): &(usize, &[u8])| {
        // SAFETY: `check` proved offset + len <= dest.len() and that no two pieces overlap, so the
        // jobs write disjoint ranges of `dest`, which we borrow mutably for the whole call.
        unsafe {
            let to = (base as *mut u8).add(offset);
            if streaming {
                stream_copy(src.as_ptr(), to, src.len());
            } else {
                std::ptr::copy_nonoverlapping(src.as_ptr(), to, src.len());
            }
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

    #[test]
    fn streaming_copy_equals_a_plain_copy_at_every_alignment() {
        let src: Vec<u8> = (0..4096 + 200).map(|i| (i * 7 % 256) as u8).collect();
        for dst_shift in [0usize, 1, 7, 15, 16, 33] {
            for (start, len) in [
                (0usize, 0usize),
                (3, 1),
                (0, 63),
                (5, 64),
                (1, 65),
                (9, 4096),
                (0, 4296),
            ] {
                let mut dst = vec![0xAAu8; 4400];
                // SAFETY: both ranges are in bounds and belong to different vectors.
                unsafe { stream_copy(src[start..].as_ptr(), dst.as_mut_ptr().add(dst_shift), len) };
                assert_eq!(&dst[dst_shift..dst_shift + len], &src[start..start + len]);
                assert!(dst[..dst_shift].iter().all(|&b| b == 0xAA));
                assert!(dst[dst_shift + len..].iter().all(|&b| b == 0xAA));
            }
        }
    }

    #[test]
    fn large_gathers_stream_and_stay_exact() {
        let big: Vec<u8> = (0..(STREAM_MIN_BYTES + 12_345))
            .map(|i| (i % 253) as u8)
            .collect();
        let mut dest = vec![0u8; big.len() + 3];
        gather(
            &mut dest,
            &[Piece {
                name: "big",
                offset: 3,
                data: &big,
            }],
        )
        .unwrap();
        assert_eq!(&dest[3..], &big[..]);
    }
}
