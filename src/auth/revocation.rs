//! Revoked keys and certificates: OpenSSH KRLs (`ssh-keygen -k`) and plain public-key lists,
//! parsed with a bound on every length and count, and the lookup a login makes.

use std::collections::{BTreeSet, HashSet};

use russh::keys::ssh_key::encoding::Encode as _;
use russh::keys::ssh_key::public::KeyData;
use russh::keys::ssh_key::{Certificate, PublicKey};
use sha1::Digest as _;

/// Largest revocation file accepted, in bytes.
pub const MAX_FILE_BYTES: usize = 64 * 1024 * 1024;
const KRL_MAGIC: &[u8; 8] = b"SSHKRL\n\0";
const KRL_FORMAT_VERSION: u32 = 1;

const SECTION_CERTIFICATES: u8 = 1;
const SECTION_EXPLICIT_KEY: u8 = 2;
const SECTION_FINGERPRINT_SHA1: u8 = 3;
const SECTION_SIGNATURE: u8 = 4;
const SECTION_FINGERPRINT_SHA256: u8 = 5;
const SECTION_EXTENSION: u8 = 255;
const CERT_SERIAL_LIST: u8 = 0x20;
const CERT_SERIAL_RANGE: u8 = 0x21;
const CERT_SERIAL_BITMAP: u8 = 0x22;
const CERT_KEY_ID: u8 = 0x23;
const CERT_EXTENSION: u8 = 0x39;

/// Why a revocation file cannot be used (every login is then refused).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KrlError {
    /// It ends in the middle of a field.
    #[error("truncated at byte {0}")]
    Truncated(usize),
    /// A KRL format version other than 1.
    #[error("unsupported KRL format version {0}")]
    Version(u32),
    /// A section or extension that must be understood is not.
    #[error("unknown mandatory section {0}")]
    UnknownSection(String),
    /// A field holds something impossible.
    #[error("malformed: {0}")]
    Malformed(String),
    /// A line of a key list is not an OpenSSH public key.
    #[error("line {0}: not an OpenSSH public key")]
    KeyLine(usize),
    /// Larger than [`MAX_FILE_BYTES`].
    #[error("larger than {MAX_FILE_BYTES} bytes")]
    TooLarge,
}

/// The revocation list in force.
#[derive(Debug, Clone, Default)]
pub enum Revocation {
    /// None configured.
    #[default]
    Off,
    /// Loaded from `path`.
    Loaded {
        /// Where it was read from.
        path: std::path::PathBuf,
        /// Which version of the file.
        stamp: Option<Stamp>,
        /// What it revokes.
        list: std::sync::Arc<Revocations>,
    },
    /// Configured but missing or corrupt: every login is refused.
    Unavailable {
        /// Where it should be.
        path: std::path::PathBuf,
        /// Which version of the file (`None`: missing).
        stamp: Option<Stamp>,
        /// Why it cannot be used.
        reason: String,
    },
}

impl Revocation {
    /// Reads the list at `path`; a failure is kept as [`Revocation::Unavailable`], never
    /// treated as "nothing revoked".
    pub fn load(path: &std::path::Path) -> Self {
        let path = path.to_owned();
        // Stamped before reading, so a change made during the read is seen as a change.
        let stamp = Stamp::of(&path);
        let read = std::fs::read(&path).map_err(|e| e.to_string());
        match read.and_then(|bytes| Revocations::parse(&bytes).map_err(|e| e.to_string())) {
            Ok(list) => Self::Loaded {
                path,
                stamp,
                list: std::sync::Arc::new(list),
            },
            Err(reason) => Self::Unavailable {
                path,
                stamp,
                reason,
            },
        }
    }

    /// The file and the version of it this was read from.
    pub fn source(&self) -> Option<(&std::path::Path, Option<&Stamp>)> {
        match self {
            Self::Off => None,
            Self::Loaded { path, stamp, .. } | Self::Unavailable { path, stamp, .. } => {
                Some((path, stamp.as_ref()))
            }
        }
    }
}

/// What identifies one version of a file: a replaced file has a new inode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stamp {
    inode: u64,
    len: u64,
    modified: Option<std::time::SystemTime>,
}

impl Stamp {
    /// The stamp of the file at `path` now, `None` if it cannot be seen.
    pub fn of(path: &std::path::Path) -> Option<Self> {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(path).ok()?;
        Some(Self {
            inode: meta.ino(),
            len: meta.len(),
            modified: meta.modified().ok(),
        })
    }
}

/// Which entry revoked a certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Revoked {
    /// Its serial (list, range or bitmap).
    Serial,
    /// Its key ID.
    KeyId,
    /// Its own public key (explicitly or by fingerprint).
    Key,
    /// The key of the CA that signed it.
    CaKey,
}

/// Serials and key IDs revoked for certificates of one CA (or of any CA).
#[derive(Debug, Default, Clone)]
struct CaScope {
    serials: BTreeSet<u64>,
    ranges: Vec<(u64, u64)>,
    bitmaps: Vec<(u64, Vec<u8>)>,
    key_ids: HashSet<String>,
}

impl CaScope {
    fn revokes(&self, cert: &Certificate) -> Option<Revoked> {
        if self.key_ids.contains(cert.key_id()) {
            return Some(Revoked::KeyId);
        }
        // Serial 0 is what a CA writes when it sets none; OpenSSH never matches it by serial.
        let serial = cert.serial();
        if serial == 0 {
            return None;
        }
        let in_bitmap = |(offset, bitmap): &(u64, Vec<u8>)| {
            let Some(bit) = serial.checked_sub(*offset) else {
                return false;
            };
            let byte_from_end = usize::try_from(bit / 8).unwrap_or(usize::MAX);
            byte_from_end < bitmap.len()
                && bitmap[bitmap.len() - 1 - byte_from_end] & (1 << (bit % 8)) != 0
        };
        let hit = self.serials.contains(&serial)
            || self
                .ranges
                .iter()
                .any(|&(lo, hi)| lo <= serial && serial <= hi)
            || self.bitmaps.iter().any(in_bitmap);
        hit.then_some(Revoked::Serial)
    }
}

/// Everything one revocation file revokes.
#[derive(Debug, Default, Clone)]
pub struct Revocations {
    /// Per CA key (`None` = certificates of any CA).
    scopes: Vec<(Option<KeyData>, CaScope)>,
    keys: HashSet<KeyData>,
    sha1: HashSet<[u8; 20]>,
    sha256: HashSet<[u8; 32]>,
}

impl Revocations {
    /// Parses a KRL, or else a list of OpenSSH public keys (one per line, `#` comments).
    pub fn parse(bytes: &[u8]) -> Result<Self, KrlError> {
        if bytes.len() > MAX_FILE_BYTES {
            return Err(KrlError::TooLarge);
        }
        if bytes.starts_with(KRL_MAGIC) {
            parse_krl(bytes)
        } else {
            parse_key_list(bytes)
        }
    }

    /// Whether `cert` is revoked, and by what.
    pub fn check(&self, cert: &Certificate) -> Option<Revoked> {
        if self.key_revoked(cert.public_key()) {
            return Some(Revoked::Key);
        }
        if self.key_revoked(cert.signature_key()) {
            return Some(Revoked::CaKey);
        }
        self.scopes
            .iter()
            .filter(|(ca, _)| ca.as_ref().is_none_or(|ca| ca == cert.signature_key()))
            .find_map(|(_, scope)| scope.revokes(cert))
    }

    fn key_revoked(&self, key: &KeyData) -> bool {
        if self.keys.contains(key) {
            return true;
        }
        if self.sha1.is_empty() && self.sha256.is_empty() {
            return false;
        }
        let Ok(blob) = key.encode_vec() else {
            return false;
        };
        let sha1: [u8; 20] = sha1::Sha1::digest(&blob).into();
        let sha256: [u8; 32] = sha2::Sha256::digest(&blob).into();
        self.sha1.contains(&sha1) || self.sha256.contains(&sha256)
    }

    /// How many entries it holds (for logs).
    pub fn len(&self) -> usize {
        let scoped: usize = self
            .scopes
            .iter()
            .map(|(_, s)| s.serials.len() + s.ranges.len() + s.bitmaps.len() + s.key_ids.len())
            .sum();
        scoped + self.keys.len() + self.sha1.len() + self.sha256.len()
    }

    /// Whether it revokes nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn parse_key_list(bytes: &[u8]) -> Result<Revocations, KrlError> {
    let text = std::str::from_utf8(bytes)
        .map_err(|_| KrlError::Malformed("neither a KRL nor text".into()))?;
    let mut revocations = Revocations::default();
    for (index, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let key = PublicKey::from_openssh(line).map_err(|_| KrlError::KeyLine(index + 1))?;
        revocations.keys.insert(key.key_data().clone());
    }
    Ok(revocations)
}

/// A bounds-checked reader of SSH wire encoding.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self { bytes, at: 0 }
    }

    fn done(&self) -> bool {
        self.at >= self.bytes.len()
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], KrlError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&end| end <= self.bytes.len())
            .ok_or(KrlError::Truncated(self.at))?;
        let slice = &self.bytes[self.at..end];
        self.at = end;
        Ok(slice)
    }

    fn u8(&mut self) -> Result<u8, KrlError> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, KrlError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64, KrlError> {
        let b = self.take(8)?;
        let mut array = [0u8; 8];
        array.copy_from_slice(b);
        Ok(u64::from_be_bytes(array))
    }

    fn string(&mut self) -> Result<&'a [u8], KrlError> {
        let len = self.u32()? as usize;
        self.take(len)
    }
}

fn parse_krl(bytes: &[u8]) -> Result<Revocations, KrlError> {
    let mut r = Reader::new(bytes);
    r.take(KRL_MAGIC.len())?;
    let version = r.u32()?;
    if version != KRL_FORMAT_VERSION {
        return Err(KrlError::Version(version));
    }
    let _krl_version = r.u64()?;
    let _generated = r.u64()?;
    let _flags = r.u64()?;
    let _reserved = r.string()?;
    let _comment = r.string()?;
    let mut revocations = Revocations::default();
    while !r.done() {
        let section = r.u8()?;
        let data = r.string()?;
        match section {
            SECTION_CERTIFICATES => parse_cert_section(data, &mut revocations)?,
            SECTION_EXPLICIT_KEY => {
                let mut keys = Reader::new(data);
                while !keys.done() {
                    revocations.keys.insert(key_blob(keys.string()?)?);
                }
            }
            SECTION_FINGERPRINT_SHA1 => fingerprints(data, &mut revocations.sha1, "SHA1")?,
            SECTION_FINGERPRINT_SHA256 => fingerprints(data, &mut revocations.sha256, "SHA256")?,
            // Its layout differs from other sections', and OpenSSH 9.4+ refuses signed KRLs.
            SECTION_SIGNATURE => {
                return Err(KrlError::UnknownSection(
                    "signature (signed KRLs are not supported; publish it unsigned)".into(),
                ))
            }
            SECTION_EXTENSION => extension(data)?,
            other => return Err(KrlError::UnknownSection(format!("0x{other:02x}"))),
        }
    }
    Ok(revocations)
}

fn parse_cert_section(data: &[u8], revocations: &mut Revocations) -> Result<(), KrlError> {
    let mut r = Reader::new(data);
    let ca_blob = r.string()?;
    let ca = if ca_blob.is_empty() {
        None
    } else {
        Some(key_blob(ca_blob)?)
    };
    let _reserved = r.string()?;
    let mut scope = CaScope::default();
    while !r.done() {
        let kind = r.u8()?;
        let body = r.string()?;
        let mut b = Reader::new(body);
        match kind {
            CERT_SERIAL_LIST => {
                while !b.done() {
                    scope.serials.insert(b.u64()?);
                }
            }
            CERT_SERIAL_RANGE => {
                let (lo, hi) = (b.u64()?, b.u64()?);
                if lo > hi {
                    return Err(malformed("serial range with min > max"));
                }
                scope.ranges.push((lo, hi));
            }
            CERT_SERIAL_BITMAP => {
                let offset = b.u64()?;
                scope.bitmaps.push((offset, b.string()?.to_vec()));
            }
            CERT_KEY_ID => {
                while !b.done() {
                    let id = std::str::from_utf8(b.string()?)
                        .map_err(|_| malformed("key ID is not UTF-8"))?;
                    scope.key_ids.insert(id.to_owned());
                }
            }
            CERT_EXTENSION => extension(body)?,
            other => {
                return Err(KrlError::UnknownSection(format!(
                    "certificate 0x{other:02x}"
                )))
            }
        }
    }
    revocations.scopes.push((ca, scope));
    Ok(())
}

/// A fingerprint section: strings of exactly `N` bytes each.
fn fingerprints<const N: usize>(
    data: &[u8],
    into: &mut HashSet<[u8; N]>,
    hash: &str,
) -> Result<(), KrlError> {
    let mut r = Reader::new(data);
    while !r.done() {
        let fp = r.string()?;
        into.insert(
            fp.try_into()
                .map_err(|_| malformed(&format!("{hash} fingerprint length")))?,
        );
    }
    Ok(())
}

/// An extension section: ignored unless it says it is critical.
fn extension(data: &[u8]) -> Result<(), KrlError> {
    let mut r = Reader::new(data);
    let name = String::from_utf8_lossy(r.string()?).into_owned();
    let critical = r.u8()? != 0;
    if critical {
        return Err(KrlError::UnknownSection(format!(
            "critical extension {name:?}"
        )));
    }
    Ok(())
}

fn key_blob(blob: &[u8]) -> Result<KeyData, KrlError> {
    PublicKey::from_bytes(blob)
        .map(|key| key.key_data().clone())
        .map_err(|e| malformed(&format!("public key: {e}")))
}

fn malformed(what: &str) -> KrlError {
    KrlError::Malformed(what.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncated_and_random_inputs_never_panic() {
        let mut krl = KRL_MAGIC.to_vec();
        krl.extend_from_slice(&1u32.to_be_bytes());
        krl.extend_from_slice(&[0u8; 24]);
        krl.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0]);
        krl.extend_from_slice(&[SECTION_CERTIFICATES, 0, 0, 0, 40]);
        krl.extend_from_slice(&[0xff; 40]);
        for len in 0..krl.len() {
            let _ = Revocations::parse(&krl[..len]);
        }
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..2000 {
            let len = (state % 300) as usize;
            let mut bytes = KRL_MAGIC.to_vec();
            for _ in 0..len {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                bytes.push(state as u8);
            }
            let _ = Revocations::parse(&bytes);
            let _ = Revocations::parse(&bytes[8..]);
        }
    }

    /// A KRL (built by hand: ssh-keygen will not write serial 0) whose certificate section
    /// for any CA revokes the serial range `lo..=hi`.
    fn krl_with_range(lo: u64, hi: u64) -> Vec<u8> {
        let mut range = vec![CERT_SERIAL_RANGE, 0, 0, 0, 16];
        range.extend_from_slice(&lo.to_be_bytes());
        range.extend_from_slice(&hi.to_be_bytes());
        let mut section = vec![0, 0, 0, 0, 0, 0, 0, 0]; // any CA, no reserved bytes
        section.extend_from_slice(&range);
        let mut krl = KRL_MAGIC.to_vec();
        krl.extend_from_slice(&1u32.to_be_bytes());
        krl.extend_from_slice(&[0u8; 24]);
        krl.extend_from_slice(&[0u8; 8]);
        krl.push(SECTION_CERTIFICATES);
        krl.extend_from_slice(&(section.len() as u32).to_be_bytes());
        krl.extend_from_slice(&section);
        krl
    }

    fn cert_with_serial(serial: u64) -> Certificate {
        use russh::keys::ssh_key::certificate::{Builder, CertType};
        let mut rng = rand::rng();
        let ca = russh::keys::ssh_key::PrivateKey::random(
            &mut rng,
            russh::keys::ssh_key::Algorithm::Ed25519,
        )
        .unwrap();
        let user = russh::keys::ssh_key::PrivateKey::random(
            &mut rng,
            russh::keys::ssh_key::Algorithm::Ed25519,
        )
        .unwrap();
        let mut builder =
            Builder::new([3u8; 16], user.public_key().key_data().clone(), 0, u64::MAX).unwrap();
        builder.cert_type(CertType::User).unwrap();
        builder.serial(serial).unwrap();
        builder.valid_principal("shop").unwrap();
        builder.sign(&ca).unwrap()
    }

    #[test]
    fn serial_ranges_never_match_serial_zero() {
        let list = Revocations::parse(&krl_with_range(0, 10)).unwrap();
        assert_eq!(list.check(&cert_with_serial(0)), None);
        assert_eq!(list.check(&cert_with_serial(1)), Some(Revoked::Serial));
        assert_eq!(list.check(&cert_with_serial(10)), Some(Revoked::Serial));
        assert_eq!(list.check(&cert_with_serial(11)), None);
        assert!(matches!(
            Revocations::parse(&krl_with_range(5, 4)),
            Err(KrlError::Malformed(_))
        ));
    }

    #[test]
    fn huge_declared_lengths_are_refused_not_allocated() {
        let mut krl = KRL_MAGIC.to_vec();
        krl.extend_from_slice(&1u32.to_be_bytes());
        krl.extend_from_slice(&[0u8; 24]);
        krl.extend_from_slice(&[0xff, 0xff, 0xff, 0xff]);
        assert!(matches!(
            Revocations::parse(&krl),
            Err(KrlError::Truncated(_))
        ));
    }

    #[test]
    fn unknown_sections_and_versions_are_refused() {
        let mut krl = KRL_MAGIC.to_vec();
        krl.extend_from_slice(&1u32.to_be_bytes());
        krl.extend_from_slice(&[0u8; 24]);
        krl.extend_from_slice(&[0u8; 8]);
        let mut unknown = krl.clone();
        unknown.extend_from_slice(&[9, 0, 0, 0, 0]);
        assert_eq!(
            Revocations::parse(&unknown).err(),
            Some(KrlError::UnknownSection("0x09".into()))
        );
        let mut v2 = krl.clone();
        v2[11] = 2;
        assert_eq!(Revocations::parse(&v2).err(), Some(KrlError::Version(2)));
        assert!(Revocations::parse(&krl).unwrap().is_empty());
    }
}
