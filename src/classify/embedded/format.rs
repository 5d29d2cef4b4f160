//! The model file format: header, feature parameters, labels, per-label bias and scale,
//! i8 weights, checksum.

use super::features::{fmix, mix, FeatureConfig};
use super::{validate_label, ClassifierError, EmbeddedClassifier, Weights, MAX_LABELS};

const MAGIC: &[u8; 8] = b"TRGCLSF\0";
/// Version 2 added the normalisation and shape feature flags and the temperature;
/// version 1 files still load (they have neither).
const FORMAT_VERSION: u16 = 2;

impl EmbeddedClassifier {
    // -----------------------------------------------------------------------
    // Serialization

    /// Encodes the model: header, labels, feature parameters, i8 weights, checksum.
    pub fn to_bytes(&self) -> Vec<u8> {
        let k = self.labels.len();
        let mut out = Vec::with_capacity(64 + self.weights.len(k) + k * 64);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        let f = &self.features;
        out.push(f.hash_bits);
        out.push(f.char_ngram_min);
        out.push(f.char_ngram_max);
        out.extend_from_slice(&f.char_weight.to_le_bytes());
        out.push(f.flags());
        out.extend_from_slice(&f.edge_bytes.to_le_bytes());
        out.extend_from_slice(&f.hash_seed.to_le_bytes());
        out.extend_from_slice(&f.max_head_bytes.to_le_bytes());
        out.extend_from_slice(&f.max_tail_bytes.to_le_bytes());
        out.extend_from_slice(&(k as u16).to_le_bytes());
        for l in &self.labels {
            out.extend_from_slice(&(l.len() as u16).to_le_bytes());
            out.extend_from_slice(l.as_bytes());
        }
        for v in self.bias.iter().chain(&self.scales) {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&self.temperature.to_le_bytes());
        out.extend_from_slice(&(self.weights.len(k) as u64).to_le_bytes());
        self.weights.write(k, &mut out);
        let sum = checksum(&out);
        out.extend_from_slice(&sum.to_le_bytes());
        out
    }

    /// Decodes a model written by [`Self::to_bytes`]; corrupt input is an error.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, ClassifierError> {
        let bad = |m: &str| ClassifierError::InvalidModel(m.to_owned());
        if bytes.len() < MAGIC.len() + 2 + 8 || !bytes.starts_with(MAGIC) {
            return Err(bad("not a triage classifier (bad magic)"));
        }
        let (body, sum) = bytes.split_at(bytes.len() - 8);
        let mut r = Reader { buf: body, pos: 0 };
        r.take(MAGIC.len())?;
        let version = r.u16()?;
        if !(1..=FORMAT_VERSION).contains(&version) {
            return Err(ClassifierError::InvalidModel(format!(
                "unsupported format version {version} (expected {FORMAT_VERSION})"
            )));
        }
        let stored = u64::from_le_bytes(sum.try_into().map_err(|_| bad("truncated"))?);
        if checksum(body) != stored {
            return Err(bad("checksum mismatch (file corrupt or truncated)"));
        }
        let hash_bits = r.u8()?;
        let char_ngram_min = r.u8()?;
        let char_ngram_max = r.u8()?;
        let char_weight = r.f32()?;
        let flags = r.u8()?;
        let known = if version == 1 { 0b111 } else { 0b1_1111 };
        if flags & !known != 0 {
            return Err(bad("unknown feature flags"));
        }
        let edge_bytes = r.u16()?;
        let hash_seed = r.u64()?;
        let max_head_bytes = r.u32()?;
        let max_tail_bytes = r.u32()?;
        let mut features = FeatureConfig {
            hash_bits,
            char_ngram_min,
            char_ngram_max,
            char_weight,
            edge_bytes,
            hash_seed,
            max_head_bytes,
            max_tail_bytes,
            ..FeatureConfig::default()
        };
        features.set_flags(flags);
        features.validate().map_err(ClassifierError::InvalidModel)?;
        let k = usize::from(r.u16()?);
        if !(2..=MAX_LABELS).contains(&k) {
            return Err(bad("label count out of range"));
        }
        let mut labels = Vec::with_capacity(k);
        for _ in 0..k {
            let len = usize::from(r.u16()?);
            let s = std::str::from_utf8(r.take(len)?).map_err(|_| bad("label is not UTF-8"))?;
            validate_label(s).map_err(ClassifierError::InvalidModel)?;
            if labels.iter().any(|l: &String| l == s) {
                return Err(bad("duplicate label"));
            }
            labels.push(s.to_owned());
        }
        let mut floats = Vec::with_capacity(2 * k);
        for _ in 0..2 * k {
            let v = r.f32()?;
            if !v.is_finite() {
                return Err(bad("non-finite parameter"));
            }
            floats.push(v);
        }
        let scales = floats.split_off(k);
        let bias = floats;
        let temperature = if version >= 2 { r.f32()? } else { 1.0 };
        if !(temperature.is_finite() && temperature > 0.0) {
            return Err(bad("temperature must be > 0"));
        }
        let n = r.u64()?;
        let expected = (1u64 << hash_bits) * k as u64;
        if n != expected {
            return Err(bad("weight count does not match header"));
        }
        let weights = Weights::from_rows(k, r.take(n as usize)?.iter().map(|&b| b as i8));
        if r.pos != body.len() {
            return Err(bad("trailing bytes"));
        }
        Ok(Self {
            labels,
            features,
            bias,
            scales,
            weights,
            temperature,
        })
    }
}

/// 64-bit checksum over 8-byte words (fast enough for a few MB at startup).
pub(super) fn checksum(data: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ data.len() as u64;
    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(c);
        h = mix(h, u64::from_le_bytes(word));
    }
    for &b in chunks.remainder() {
        h = mix(h, u64::from(b));
    }
    fmix(h)
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], ClassifierError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| ClassifierError::InvalidModel("truncated".into()))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], ClassifierError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn u8(&mut self) -> Result<u8, ClassifierError> {
        Ok(self.array::<1>()?[0])
    }

    fn u16(&mut self) -> Result<u16, ClassifierError> {
        Ok(u16::from_le_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, ClassifierError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, ClassifierError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn f32(&mut self) -> Result<f32, ClassifierError> {
        Ok(f32::from_le_bytes(self.array()?))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::classify::embedded::test_support::*;
    use crate::classify::embedded::TrainOptions;

    #[test]
    fn round_trip_preserves_predictions() {
        let data = small_set();
        let m = EmbeddedClassifier::train(&data, &small_opts()).unwrap();
        let bytes = m.to_bytes();
        let back = EmbeddedClassifier::from_bytes(&bytes).unwrap();
        assert_eq!(back, m);
        assert_eq!(back.labels(), m.labels());
        assert_eq!(back.feature_config(), m.feature_config());
        for t in data.iter().map(|e| e.text.clone()).chain(tricky_texts()) {
            assert_eq!(m.classify(&t), back.classify(&t), "{t:.40}");
        }
        assert_eq!(back.to_bytes(), bytes);
    }

    #[test]
    fn corrupt_bytes_are_errors() {
        let m = EmbeddedClassifier::train(&small_set(), &small_opts()).unwrap();
        let bytes = m.to_bytes();
        assert!(EmbeddedClassifier::from_bytes(&[]).is_err());
        assert!(EmbeddedClassifier::from_bytes(b"not a model at all").is_err());
        assert!(EmbeddedClassifier::from_bytes(MAGIC).is_err());
        for cut in [
            9,
            10,
            20,
            40,
            bytes.len() / 2,
            bytes.len() - 9,
            bytes.len() - 1,
        ] {
            assert!(
                EmbeddedClassifier::from_bytes(&bytes[..cut]).is_err(),
                "cut {cut}"
            );
        }
        for pos in [8, 12, 30, bytes.len() / 2, bytes.len() - 3] {
            let mut b = bytes.clone();
            b[pos] ^= 0x5a;
            assert!(EmbeddedClassifier::from_bytes(&b).is_err(), "flip {pos}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(EmbeddedClassifier::from_bytes(&longer).is_err());
    }

    #[test]
    fn corrupt_fields_with_valid_checksum_are_errors() {
        let m = EmbeddedClassifier::train(&small_set(), &small_opts()).unwrap();
        let bytes = m.to_bytes();
        // Re-seal after patching so the field checks, not the checksum, must catch it.
        let reseal = |patch: &dyn Fn(&mut Vec<u8>)| {
            let mut body = bytes[..bytes.len() - 8].to_vec();
            patch(&mut body);
            let sum = checksum(&body);
            body.extend_from_slice(&sum.to_le_bytes());
            EmbeddedClassifier::from_bytes(&body)
        };
        assert!(reseal(&|_| {}).is_ok());
        assert!(reseal(&|b| b[8] = 99).is_err()); // version
        assert!(reseal(&|b| b[10] = 60).is_err()); // hash bits
        assert!(reseal(&|b| b[12] = 200).is_err()); // n-gram max
        assert!(reseal(&|b| b[17] = 0xff).is_err()); // flags
        assert!(reseal(&|b| b.truncate(b.len() - 1)).is_err());
    }

    #[test]
    fn temperature_and_new_flags_round_trip() {
        let opts = TrainOptions {
            features: FeatureConfig {
                normalize: true,
                shape_features: true,
                ..small_opts().features
            },
            ..small_opts()
        };
        let mut m = EmbeddedClassifier::train(&small_set(), &opts).unwrap();
        assert!(m.feature_config().normalize && m.feature_config().shape_features);
        m.set_temperature(1.7);
        let back = EmbeddedClassifier::from_bytes(&m.to_bytes()).unwrap();
        assert_eq!(back.temperature(), 1.7);
        assert_eq!(back, m);
        // A higher temperature keeps the label but lowers the confidence.
        let mut hot = m.clone();
        hot.set_temperature(4.0);
        let (a, b) = (
            m.classify("what is 12 times 7"),
            hot.classify("what is 12 times 7"),
        );
        assert_eq!(a.label, b.label);
        assert!(b.confidence < a.confidence);
        m.set_temperature(f32::NAN);
        assert_eq!(m.temperature(), 1.7);
    }

    /// Files written before the temperature and the normalisation/shape flags existed
    /// still load, with neither.
    #[test]
    fn version_1_files_load() {
        let opts = TrainOptions {
            features: FeatureConfig {
                normalize: false,
                shape_features: false,
                ..small_opts().features
            },
            ..small_opts()
        };
        let m = EmbeddedClassifier::train(&small_set(), &opts).unwrap();
        let v2 = m.to_bytes();
        let k = m.labels().len();
        // The temperature sits right after the bias and scale floats, before the weight count.
        let weights_at = v2.len() - 8 - m.weights.len(k) - 8;
        let mut v1 = v2[..weights_at - 4].to_vec();
        v1.extend_from_slice(&v2[weights_at..v2.len() - 8]);
        v1[8..10].copy_from_slice(&1u16.to_le_bytes());
        let sum = checksum(&v1);
        v1.extend_from_slice(&sum.to_le_bytes());
        let old = EmbeddedClassifier::from_bytes(&v1).unwrap();
        assert_eq!(old, m);
        assert_eq!(old.temperature(), 1.0);
        // A version 1 file cannot claim the newer flags.
        let mut bad = v1[..v1.len() - 8].to_vec();
        bad[17] |= 0b1000;
        let sum = checksum(&bad);
        bad.extend_from_slice(&sum.to_le_bytes());
        assert!(EmbeddedClassifier::from_bytes(&bad).is_err());
    }
}
