//! [`Decimal4`]: a decimal number with at most four places, held exactly as ten-thousandths.
//!
//! Reputation adds 0.01 per chat message; in binary floating point a million of them do not sum
//! to 10,000. Scores, weights and amounts are therefore fixed-point, and JSON carries them as
//! ordinary numbers (`0.01`, `612.5`), read to the nearest ten-thousandth.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::ops::{Add, Mul, Neg, Sub};
use utoipa::openapi::schema::{ObjectBuilder, Schema, Type};
use utoipa::openapi::RefOr;
use utoipa::{PartialSchema, ToSchema};

/// Ten-thousandths: `Decimal4(6_000_000)` is 600.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Decimal4(pub i64);

/// The largest magnitude a JSON number may have to be read (a trillion, far beyond any score,
/// weight or donation).
const LIMIT: f64 = 1e12;

impl Decimal4 {
    pub const ZERO: Decimal4 = Decimal4(0);
    /// Units per 1.
    pub const SCALE: i64 = 10_000;

    /// `n` whole units.
    pub const fn units(n: i64) -> Self {
        Decimal4(n * Self::SCALE)
    }

    /// `n` ten-thousandths.
    pub const fn raw(n: i64) -> Self {
        Decimal4(n)
    }

    /// The nearest value to `x`, or `None` for NaN, infinities and magnitudes over 10¹².
    pub fn from_f64(x: f64) -> Option<Self> {
        if !x.is_finite() || x.abs() > LIMIT {
            return None;
        }
        Some(Decimal4((x * Self::SCALE as f64).round() as i64))
    }

    pub fn to_f64(self) -> f64 {
        self.0 as f64 / Self::SCALE as f64
    }

    /// Rounded to the nearest whole unit, halves away from zero (612.5 → 613).
    pub fn round(self) -> i64 {
        let (q, r) = (self.0 / Self::SCALE, self.0 % Self::SCALE);
        if r.abs() * 2 >= Self::SCALE {
            q + r.signum()
        } else {
            q
        }
    }

    pub fn clamp(self, min: Decimal4, max: Decimal4) -> Self {
        if self < min {
            min
        } else if self > max {
            max
        } else {
            self
        }
    }

    /// Whether it has more than `places` decimal places.
    pub fn has_more_places_than(self, places: u32) -> bool {
        self.0 % 10i64.pow(4u32.saturating_sub(places)) != 0
    }

    pub fn is_positive(self) -> bool {
        self.0 > 0
    }

    pub fn is_negative(self) -> bool {
        self.0 < 0
    }
}

impl Add for Decimal4 {
    type Output = Decimal4;
    fn add(self, rhs: Decimal4) -> Decimal4 {
        Decimal4(self.0.saturating_add(rhs.0))
    }
}

impl Sub for Decimal4 {
    type Output = Decimal4;
    fn sub(self, rhs: Decimal4) -> Decimal4 {
        Decimal4(self.0.saturating_sub(rhs.0))
    }
}

impl Neg for Decimal4 {
    type Output = Decimal4;
    fn neg(self) -> Decimal4 {
        Decimal4(self.0.saturating_neg())
    }
}

/// A weight times a whole count (`3` gifts, `1` message).
impl Mul<i64> for Decimal4 {
    type Output = Decimal4;
    fn mul(self, rhs: i64) -> Decimal4 {
        Decimal4(self.0.saturating_mul(rhs))
    }
}

/// A weight times a decimal quantity (a donation's amount), rounded to four places.
impl Mul<Decimal4> for Decimal4 {
    type Output = Decimal4;
    fn mul(self, rhs: Decimal4) -> Decimal4 {
        let product = i128::from(self.0) * i128::from(rhs.0);
        let scale = i128::from(Self::SCALE);
        let rounded = (product + product.signum() * scale / 2) / scale;
        Decimal4(i64::try_from(rounded).unwrap_or(if rounded > 0 { i64::MAX } else { i64::MIN }))
    }
}

impl fmt::Display for Decimal4 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sign = if self.0 < 0 { "-" } else { "" };
        let (whole, frac) = (
            (self.0 / Self::SCALE).unsigned_abs(),
            (self.0 % Self::SCALE).unsigned_abs(),
        );
        if frac == 0 {
            write!(f, "{sign}{whole}")
        } else {
            let digits = format!("{frac:04}");
            write!(f, "{sign}{whole}.{}", digits.trim_end_matches('0'))
        }
    }
}

impl Serialize for Decimal4 {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        // The shortest f64 text of a value with at most four places reads back as the same
        // ten-thousandths.
        s.serialize_f64(self.to_f64())
    }
}

impl<'de> Deserialize<'de> for Decimal4 {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let x = f64::deserialize(d)?;
        Decimal4::from_f64(x).ok_or_else(|| {
            serde::de::Error::custom(format!("{x} is not a number of at most 10^12"))
        })
    }
}

impl PartialSchema for Decimal4 {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::Number)
            .description(Some("A decimal number, exact to four places."))
            .build()
            .into()
    }
}

impl ToSchema for Decimal4 {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_million_hundredths_sum_exactly() {
        let cent = Decimal4::from_f64(0.01).expect("finite");
        let mut sum = Decimal4::units(600);
        for _ in 0..1_000_000 {
            sum = sum + cent;
        }
        assert_eq!(sum, Decimal4::units(10_600));
    }

    #[test]
    fn json_numbers_round_trip_exactly() {
        for text in ["0.01", "-0.1", "612.5", "850", "-200", "12.3456", "0"] {
            let d: Decimal4 = serde_json::from_str(text).expect("number");
            let back: Decimal4 =
                serde_json::from_str(&serde_json::to_string(&d).expect("json")).expect("number");
            assert_eq!(back, d, "{text}");
            assert_eq!(d.to_string(), text);
        }
        assert_eq!(
            serde_json::to_string(&Decimal4::raw(100)).ok().as_deref(),
            Some("0.01")
        );
        assert!(serde_json::from_str::<Decimal4>("1e13").is_err());
    }

    #[test]
    fn display_rounding_and_products() {
        assert_eq!(Decimal4::raw(6_125_000).to_string(), "612.5");
        assert_eq!(Decimal4::raw(-1_000).to_string(), "-0.1");
        assert_eq!(Decimal4::raw(6_125_000).round(), 613);
        assert_eq!(Decimal4::raw(6_124_999).round(), 612);
        assert_eq!(Decimal4::raw(-6_125_000).round(), -613);
        let per_unit = Decimal4::units(1);
        assert_eq!(per_unit * Decimal4::raw(123_400), Decimal4::raw(123_400));
        assert_eq!(Decimal4::raw(100) * 3, Decimal4::raw(300));
        assert!(Decimal4::raw(1).has_more_places_than(2));
        assert!(!Decimal4::raw(100).has_more_places_than(2));
        assert_eq!(
            Decimal4::units(900).clamp(Decimal4::units(300), Decimal4::units(850)),
            Decimal4::units(850)
        );
    }
}
