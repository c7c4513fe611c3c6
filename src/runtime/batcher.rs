//! Forms batches from the job queue: FIFO, at most `max_images` images, one expert per batch on the merged
//! path or many experts when the mixed path is on; waits for announced work only up to the batch wait.

use std::{
    collections::VecDeque,
    sync::{
        atomic::{AtomicUsize, Ordering},
        mpsc, Arc,
    },
    time::{Duration, Instant},
};

use super::Job;

/// How long an idle backend waits for a job before it looks at other work (finished promotions).
const IDLE_POLL: Duration = Duration::from_millis(50);

#[derive(Debug, Clone, Copy)]
pub struct BatchPolicy {
    pub max_images: usize,
    pub max_wait: Duration,
    /// Jobs of different experts may share a batch (the mixed path is on).
    pub mixing: bool,
}

pub enum Next {
    Batch(Vec<Job>),
    /// Nothing to run right now.
    Idle,
    /// Every handle is gone: the server has ended.
    Closed,
}

pub struct Batcher {
    policy: BatchPolicy,
    /// Jobs announced by the HTTP side and not yet answered (see `Backend::announce`).
    expected: Arc<AtomicUsize>,
    /// Jobs received that did not fit the batch being formed; they start the next ones, in arrival order.
    pending: VecDeque<Job>,
}

impl Batcher {
    pub fn new(policy: BatchPolicy, expected: Arc<AtomicUsize>) -> Batcher {
        Batcher {
            policy,
            expected,
            pending: VecDeque::new(),
        }
    }

    /// The next batch: the oldest job, the set-aside jobs that may join it, then new ones while announced work is
    /// on its way and the batch wait has not passed.
    pub fn next(&mut self, rx: &mpsc::Receiver<Job>) -> Next {
        let first = match self.pending.pop_front() {
            Some(job) => job,
            None => match rx.recv_timeout(IDLE_POLL) {
                Ok(job) => job,
                Err(mpsc::RecvTimeoutError::Timeout) => return Next::Idle,
                Err(mpsc::RecvTimeoutError::Disconnected) => return Next::Closed,
            },
        };
        let max_images = self.policy.max_images.max(1);
        let mut images = first.images;
        let mut batch = vec![first];
        let mut i = 0;
        while i < self.pending.len() && images < max_images {
            if joins(&self.policy, &batch[0], &self.pending[i])
                && images + self.pending[i].images <= max_images
            {
                let job = self.pending.remove(i).expect("index checked");
                images += job.images;
                batch.push(job);
            } else {
                i += 1;
            }
        }
        let deadline = Instant::now() + self.policy.max_wait;
        while images < max_images {
            let others_on_their_way =
                self.expected.load(Ordering::Acquire) > batch.len() + self.pending.len();
            let next = if others_on_their_way {
                rx.recv_timeout(deadline.saturating_duration_since(Instant::now()))
                    .ok()
            } else {
                rx.try_recv().ok()
            };
            let Some(job) = next else { break };
            if joins(&self.policy, &batch[0], &job) && images + job.images <= max_images {
                images += job.images;
                batch.push(job);
            } else {
                self.pending.push_back(job);
            }
        }
        // Clients that gave up (timeout, disconnect) are not worth running for.
        batch.retain(|job| !job.reply.is_closed());
        if batch.is_empty() {
            Next::Idle
        } else {
            Next::Batch(batch)
        }
    }
}

/// Whether `job` may share a batch started by `first`: same input size, and the same expert, or both mixable
/// while the mixed path is on.
fn joins(policy: &BatchPolicy, first: &Job, job: &Job) -> bool {
    (first.height, first.width) == (job.height, job.width)
        && (first.runnable.same_expert(&job.runnable)
            || (policy.mixing && first.runnable.deltas.is_some() && job.runnable.deltas.is_some()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{expert::Runnable, package::ExpertDeltas};

    fn deltas() -> Arc<ExpertDeltas> {
        Arc::new(ExpertDeltas {
            scale: 1.0,
            factors: Vec::new(),
            head_weight: vec![0.0; 2],
            head_bias: vec![0.0; 2],
        })
    }

    fn job(
        task: &str,
        images: usize,
        mixable: bool,
    ) -> (
        Job,
        tokio::sync::oneshot::Receiver<Result<super::super::InferOutput, String>>,
    ) {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let job = Job {
            runnable: Runnable {
                task: task.into(),
                version: "v".into(),
                classes: 2,
                deltas: mixable.then(deltas),
                assembled: None,
            },
            input: vec![0.0; images],
            images,
            height: 28,
            width: 28,
            enqueued: Instant::now(),
            reply,
        };
        (job, answer)
    }

    fn policy(mixing: bool) -> BatchPolicy {
        BatchPolicy {
            max_images: 4,
            max_wait: Duration::from_millis(0),
            mixing,
        }
    }

    fn tasks(next: Next) -> Vec<String> {
        match next {
            Next::Batch(batch) => batch.iter().map(|j| j.runnable.task.clone()).collect(),
            _ => panic!("expected a batch"),
        }
    }

    #[test]
    fn merged_batches_hold_one_expert_and_keep_the_others_in_order() {
        let (tx, rx) = mpsc::channel();
        let mut answers = Vec::new();
        for (task, images) in [("a", 1), ("b", 1), ("a", 2), ("c", 1), ("a", 2)] {
            let (job, answer) = job(task, images, true);
            answers.push(answer);
            tx.send(job).unwrap();
        }
        let mut batcher = Batcher::new(policy(false), Arc::new(AtomicUsize::new(0)));
        assert_eq!(
            tasks(batcher.next(&rx)),
            ["a", "a"],
            "3 images; the next `a` would make 5"
        );
        assert_eq!(tasks(batcher.next(&rx)), ["b"]);
        assert_eq!(tasks(batcher.next(&rx)), ["c"]);
        assert_eq!(tasks(batcher.next(&rx)), ["a"]);
        assert!(matches!(batcher.next(&rx), Next::Idle));
        drop(tx);
        assert!(matches!(batcher.next(&rx), Next::Closed));
    }

    #[test]
    fn mixed_batches_take_any_mixable_expert_in_arrival_order() {
        let (tx, rx) = mpsc::channel();
        let mut answers = Vec::new();
        for (task, images, mixable) in [
            ("a", 1, true),
            ("b", 1, true),
            ("base", 1, false),
            ("c", 2, true),
            ("d", 1, true),
        ] {
            let (job, answer) = job(task, images, mixable);
            answers.push(answer);
            tx.send(job).unwrap();
        }
        let mut batcher = Batcher::new(policy(true), Arc::new(AtomicUsize::new(0)));
        assert_eq!(tasks(batcher.next(&rx)), ["a", "b", "c"]);
        assert_eq!(
            tasks(batcher.next(&rx)),
            ["base"],
            "a job without factors runs alone"
        );
        assert_eq!(tasks(batcher.next(&rx)), ["d"]);
    }

    #[test]
    fn jobs_whose_client_left_are_dropped_and_announced_work_is_awaited() {
        let (tx, rx) = mpsc::channel();
        let (gone, answer) = job("a", 1, true);
        drop(answer);
        tx.send(gone).unwrap();
        let mut batcher = Batcher::new(
            BatchPolicy {
                max_wait: Duration::from_millis(500),
                ..policy(true)
            },
            Arc::new(AtomicUsize::new(2)),
        );
        let (late, _answer) = job("b", 1, true);
        let sender = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            tx.send(late).unwrap();
        });
        // Two announced, one here: the batcher waits for the second, then drops the abandoned first.
        assert_eq!(tasks(batcher.next(&rx)), ["b"]);
        sender.join().unwrap();
    }
}
