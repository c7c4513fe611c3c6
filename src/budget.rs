//! The request-memory budget: a byte-counting semaphore that every body read, decode and assembly draws from.
//!
//! Why: limits per request (body size, image pixels, images per request) bound one request, not a crowd of
//! them. Every byte a request holds beyond a few kilobytes is reserved here first, so the sum over all clients
//! stays under `LORKD_REQUEST_MEMORY_BYTES` whatever they send; when it is spent, new work is refused at once
//! (503 + Retry-After) instead of waiting or growing. Reservations are owned values: whoever holds one (a
//! blocking decode job, say) keeps the bytes reserved until it is dropped, even if the HTTP request that asked
//! for it was cancelled meanwhile.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Tokio semaphores count in `u32` per acquisition and at most `usize::MAX >> 3` in all: count in 1 KiB units.
const UNIT: u64 = 1024;

fn units(bytes: u64) -> u64 {
    bytes.div_ceil(UNIT)
}

#[derive(Clone)]
pub struct MemoryBudget {
    semaphore: Arc<Semaphore>,
    total_units: u64,
}

impl std::fmt::Debug for MemoryBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryBudget")
            .field("total_bytes", &self.total_bytes())
            .field("in_use_bytes", &self.in_use_bytes())
            .finish()
    }
}

/// Bytes reserved from a [`MemoryBudget`]; given back when dropped.
#[derive(Debug)]
pub struct Reservation {
    permit: Option<OwnedSemaphorePermit>,
    budget: MemoryBudget,
}

/// The budget cannot cover the request right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exhausted;

impl MemoryBudget {
    pub fn new(total_bytes: u64) -> Self {
        let total_units = units(total_bytes).min((usize::MAX >> 4) as u64).max(1);
        MemoryBudget {
            semaphore: Arc::new(Semaphore::new(total_units as usize)),
            total_units,
        }
    }

    pub fn total_bytes(&self) -> u64 {
        self.total_units * UNIT
    }

    pub fn in_use_bytes(&self) -> u64 {
        (self.total_units - self.semaphore.available_permits() as u64) * UNIT
    }

    /// An empty reservation, to be grown as bytes arrive.
    pub fn empty(&self) -> Reservation {
        Reservation {
            permit: None,
            budget: self.clone(),
        }
    }

    /// Reserves `bytes` now or fails at once (never waits: a full budget is answered, not queued).
    pub fn try_reserve(&self, bytes: u64) -> Result<Reservation, Exhausted> {
        let mut reservation = self.empty();
        reservation.grow(bytes)?;
        Ok(reservation)
    }
}

impl Reservation {
    pub fn bytes(&self) -> u64 {
        self.permit.as_ref().map_or(0, |p| p.num_permits() as u64) * UNIT
    }

    /// Adds `bytes` to this reservation, or fails (and keeps what it had) when the budget cannot cover them.
    pub fn grow(&mut self, bytes: u64) -> Result<(), Exhausted> {
        let wanted = units(bytes);
        if wanted == 0 {
            return Ok(());
        }
        let wanted = u32::try_from(wanted).map_err(|_| Exhausted)?;
        let more = self
            .budget
            .semaphore
            .clone()
            .try_acquire_many_owned(wanted)
            .map_err(|_| Exhausted)?;
        match &mut self.permit {
            Some(permit) => permit.merge(more),
            None => self.permit = Some(more),
        }
        Ok(())
    }

    /// Grows the reservation until it holds at least `bytes`.
    pub fn grow_to(&mut self, bytes: u64) -> Result<(), Exhausted> {
        let held = self.bytes();
        if bytes > held {
            self.grow(bytes - held)
        } else {
            Ok(())
        }
    }

    /// Moves the bytes of `other` into this reservation.
    pub fn absorb(&mut self, mut other: Reservation) {
        if let Some(more) = other.permit.take() {
            match &mut self.permit {
                Some(permit) => permit.merge(more),
                None => self.permit = Some(more),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_add_up_and_are_returned_on_drop() {
        let budget = MemoryBudget::new(10 * UNIT);
        let mut a = budget.try_reserve(3 * UNIT).unwrap();
        assert_eq!(budget.in_use_bytes(), 3 * UNIT);
        a.grow(1).unwrap(); // rounds up to one unit
        assert_eq!(a.bytes(), 4 * UNIT);
        let b = budget.try_reserve(6 * UNIT).unwrap();
        assert_eq!(budget.try_reserve(1).unwrap_err(), Exhausted);
        assert_eq!(a.grow(UNIT), Err(Exhausted));
        assert_eq!(a.bytes(), 4 * UNIT, "a failed grow keeps what was held");
        drop(b);
        a.grow_to(8 * UNIT).unwrap();
        assert_eq!(a.bytes(), 8 * UNIT);
        a.grow_to(2 * UNIT).unwrap();
        assert_eq!(a.bytes(), 8 * UNIT);
        let mut c = budget.empty();
        c.absorb(a);
        assert_eq!(c.bytes(), 8 * UNIT);
        drop(c);
        assert_eq!(budget.in_use_bytes(), 0);
    }

    #[test]
    fn huge_requests_fail_instead_of_overflowing() {
        let budget = MemoryBudget::new(u64::MAX);
        assert!(budget.try_reserve(u64::MAX).is_err());
        assert!(budget.try_reserve(1 << 30).is_ok());
    }
}
