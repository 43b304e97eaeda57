//! Content digests (`sha256:<hex>`, `sha512:<hex>`): validation, hashing and
//! layer chain IDs.
//!
//! Digests name files in the content store, so only well-formed lowercase
//! hex of the right length is accepted: a digest can never carry a `/` or
//! `..` into a path.

use std::fmt;
use std::io::{self, Read};

use sha2::{Digest as _, Sha256, Sha512};

use crate::ImageError;

/// A hash algorithm the content store accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Algorithm {
    Sha256,
    Sha512,
}

impl Algorithm {
    /// Returns the algorithm's name as digests spell it, also the name of
    /// its directory under `blobs/`.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Sha256 => "sha256",
            Self::Sha512 => "sha512",
        }
    }

    fn hex_len(self) -> usize {
        match self {
            Self::Sha256 => 64,
            Self::Sha512 => 128,
        }
    }

    fn from_name(name: &str) -> Option<Self> {
        match name {
            "sha256" => Some(Self::Sha256),
            "sha512" => Some(Self::Sha512),
            _ => None,
        }
    }
}

/// A validated content digest.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct Digest {
    algorithm: Algorithm,
    hex: String,
}

/// A digest string that is not `sha256:` or `sha512:` followed by lowercase hex.
#[derive(Debug, thiserror::Error)]
#[error("{digest:?} is not a valid digest: {reason}")]
pub(crate) struct InvalidDigest {
    digest: String,
    reason: &'static str,
}

impl InvalidDigest {
    /// Converts the error into an [`ImageError`] that names the image it came from.
    pub(crate) fn for_image(self, reference: &str) -> ImageError {
        ImageError::InvalidContent {
            reference: reference.to_string(),
            what: "digest",
            reason: self.to_string(),
        }
    }
}

impl Digest {
    /// Parses `algorithm:hex`, accepting sha256 and sha512 with lowercase hex
    /// of the algorithm's length.
    pub(crate) fn parse(input: &str) -> Result<Self, InvalidDigest> {
        let invalid = |reason| InvalidDigest {
            digest: input.to_string(),
            reason,
        };

        let (name, hex) = input
            .split_once(':')
            .ok_or_else(|| invalid("expected algorithm:hex"))?;
        let algorithm = Algorithm::from_name(name)
            .ok_or_else(|| invalid("only sha256 and sha512 are supported"))?;
        if hex.len() != algorithm.hex_len() {
            return Err(invalid("the hex part has the wrong length"));
        }
        if !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(invalid("the hex part must be lowercase hexadecimal"));
        }

        Ok(Self {
            algorithm,
            hex: hex.to_string(),
        })
    }

    /// Builds a sha256 digest from its hex part, as found in a file name.
    pub(crate) fn from_sha256_hex(hex: &str) -> Result<Self, InvalidDigest> {
        Self::parse(&format!("sha256:{hex}"))
    }

    /// Computes the sha256 digest of `bytes`.
    pub(crate) fn sha256_of(bytes: &[u8]) -> Self {
        let mut hasher = Hasher::new(Algorithm::Sha256);
        hasher.update(bytes);
        hasher.finish()
    }

    pub(crate) fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    pub(crate) fn hex(&self) -> &str {
        &self.hex
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.algorithm.name(), self.hex)
    }
}

/// An incremental hash of one algorithm.
#[derive(Clone)]
pub(crate) enum Hasher {
    Sha256(Sha256),
    Sha512(Sha512),
}

impl Hasher {
    pub(crate) fn new(algorithm: Algorithm) -> Self {
        match algorithm {
            Algorithm::Sha256 => Self::Sha256(Sha256::new()),
            Algorithm::Sha512 => Self::Sha512(Sha512::new()),
        }
    }

    pub(crate) fn update(&mut self, bytes: &[u8]) {
        match self {
            Self::Sha256(h) => h.update(bytes),
            Self::Sha512(h) => h.update(bytes),
        }
    }

    /// Consumes the hasher and returns the digest of everything it was fed.
    pub(crate) fn finish(self) -> Digest {
        let (algorithm, hex) = match self {
            Self::Sha256(h) => (Algorithm::Sha256, hex::encode(h.finalize())),
            Self::Sha512(h) => (Algorithm::Sha512, hex::encode(h.finalize())),
        };
        Digest { algorithm, hex }
    }
}

/// A reader that hashes and counts every byte read through it.
pub(crate) struct HashingReader<R> {
    inner: R,
    hasher: Hasher,
    bytes: u64,
}

impl<R: Read> HashingReader<R> {
    pub(crate) fn new(inner: R, algorithm: Algorithm) -> Self {
        Self {
            inner,
            hasher: Hasher::new(algorithm),
            bytes: 0,
        }
    }

    /// Reads the rest of the stream and returns its digest and total length.
    pub(crate) fn finish(mut self) -> io::Result<(Digest, u64)> {
        io::copy(&mut self, &mut io::sink())?;
        Ok((self.hasher.finish(), self.bytes))
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
}

/// Computes the chain ID of every layer from the layers' diff IDs, bottom
/// layer first, as the OCI image spec defines it: the first chain ID is the
/// first diff ID, and each next one is `sha256(previous + " " + diff_id)`.
pub(crate) fn chain_ids(diff_ids: &[Digest]) -> Vec<Digest> {
    let mut chain: Vec<Digest> = Vec::with_capacity(diff_ids.len());
    for diff_id in diff_ids {
        let next = match chain.last() {
            None => diff_id.clone(),
            Some(previous) => Digest::sha256_of(format!("{previous} {diff_id}").as_bytes()),
        };
        chain.push(next);
    }
    chain
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn parse_accepts_sha256_and_sha512() {
        let d = Digest::parse(&format!("sha256:{EMPTY_SHA256}")).expect("valid sha256");
        assert_eq!(d.algorithm(), Algorithm::Sha256);
        assert_eq!(d.hex(), EMPTY_SHA256);
        assert_eq!(d.to_string(), format!("sha256:{EMPTY_SHA256}"));

        let hex512 = "a".repeat(128);
        let d = Digest::parse(&format!("sha512:{hex512}")).expect("valid sha512");
        assert_eq!(d.algorithm(), Algorithm::Sha512);
    }

    #[test]
    fn parse_rejects_path_characters_and_bad_forms() {
        let cases = [
            "sha256".to_string(),
            format!("md5:{EMPTY_SHA256}"),
            "sha256:../../etc/passwd".to_string(),
            format!("sha256:{}", EMPTY_SHA256.to_uppercase()),
            format!("sha256:{EMPTY_SHA256}0"),
            format!("sha256:{}/x", &EMPTY_SHA256[..62]),
            "sha256:".to_string(),
        ];
        for case in cases {
            assert!(Digest::parse(&case).is_err(), "{case:?} must be rejected");
        }
    }

    #[test]
    fn sha256_of_empty_input_is_the_known_value() {
        assert_eq!(Digest::sha256_of(b"").hex(), EMPTY_SHA256);
    }

    #[test]
    fn hashing_reader_covers_unread_tail() {
        let data = b"hello world".to_vec();
        let mut reader = HashingReader::new(&data[..], Algorithm::Sha256);
        let mut first = [0u8; 5];
        reader.read_exact(&mut first).expect("read the first bytes");
        let (digest, len) = reader.finish().expect("drain");
        assert_eq!(len, data.len() as u64);
        assert_eq!(digest, Digest::sha256_of(&data));
    }

    #[test]
    fn chain_ids_follow_the_oci_definition() {
        let d0 = Digest::sha256_of(b"layer zero");
        let d1 = Digest::sha256_of(b"layer one");
        let d2 = Digest::sha256_of(b"layer two");

        // Computed by hand from the definition with a fresh sha256.
        let expected1 = {
            let mut h = Sha256::new();
            h.update(format!("sha256:{} sha256:{}", d0.hex(), d1.hex()).as_bytes());
            format!("sha256:{}", hex::encode(h.finalize()))
        };
        let expected2 = {
            let mut h = Sha256::new();
            h.update(format!("{expected1} sha256:{}", d2.hex()).as_bytes());
            format!("sha256:{}", hex::encode(h.finalize()))
        };

        let chain = chain_ids(&[d0.clone(), d1, d2]);
        assert_eq!(chain.len(), 3);
        assert_eq!(chain[0], d0);
        assert_eq!(chain[1].to_string(), expected1);
        assert_eq!(chain[2].to_string(), expected2);
    }

    #[test]
    fn chain_id_of_empty_layers_is_known() {
        // From `printf 'sha256:<e> sha256:<e>' | sha256sum` with <e> the
        // sha256 of empty input.
        let empty = Digest::sha256_of(b"");
        let chain = chain_ids(&[empty.clone(), empty]);
        assert_eq!(
            chain[1].hex(),
            "de9d9016b852e46e9f3973e20d3a6d17e120f7144931d50cd6e2a8ad53e81960"
        );
    }
}
