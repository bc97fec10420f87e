//! The one VM state machine: which action each [`VmState`] allows.
//!
//! fvd and fv-worker both ask [`allows`] instead of keeping their own lists, so a
//! refusal reads the same wherever it comes from. The table follows Hyper-V
//! (hyperv-semantics.md §2): Start from Off or Saved (restore), Turn Off pulls the
//! plug in every state in which a QEMU exists (cancelling whatever runs: a save,
//! a shut down, a reset), Shut Down needs a running guest, Save works from Running
//! or Paused, Delete needs Off or Saved, hardware changes need Off.
//!
//! Critical is a failure state: the VM may or may not still have a worker. It
//! allows what recovers it (Start, Turn Off of what is left, Delete) and nothing that
//! needs a working guest.

use crate::VmState;
use serde::{Deserialize, Serialize};

/// Every state, for exhaustive tables and tests.
pub const ALL_STATES: [VmState; 9] = [
    VmState::Off,
    VmState::Starting,
    VmState::Running,
    VmState::Paused,
    VmState::Saving,
    VmState::Saved,
    VmState::Stopping,
    VmState::Resetting,
    VmState::Critical,
];

/// What a user (or fvd on a user's behalf) asks of a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Cold boot from Off, or restore from Saved.
    Start,
    /// Pull the plug. Cancels a save, shut down or reset in progress.
    TurnOff,
    /// Graceful shut down through the guest (agent or ACPI power button).
    ShutDown,
    /// Shut down again while one is already in progress (`--force`: turn off on
    /// refusal or timeout).
    ForceShutDown,
    /// Write memory and device state, then stop.
    Save,
    Pause,
    Resume,
    /// Hardware reset; a paused VM resumes running after it (Hyper-V's Reset).
    Reset,
    /// Make the next start a cold boot.
    DiscardSavedState,
    /// Unregister the VM (its files stay unless asked).
    Delete,
    /// Change hardware (CPU count, memory, disks, NICs, firmware).
    ChangeHardware,
    /// Insert or eject a DVD medium (live while running or paused).
    ChangeMedia,
    /// Anything that talks to the guest: ping, freeze/thaw, copy-file, time sync.
    GuestService,
}

/// Every action, for exhaustive tables and tests.
pub const ALL_ACTIONS: [Action; 13] = [
    Action::Start,
    Action::TurnOff,
    Action::ShutDown,
    Action::ForceShutDown,
    Action::Save,
    Action::Pause,
    Action::Resume,
    Action::Reset,
    Action::DiscardSavedState,
    Action::Delete,
    Action::ChangeHardware,
    Action::ChangeMedia,
    Action::GuestService,
];

impl Action {
    /// The verb as it appears in messages ("cannot {verb} while …").
    pub fn verb(self) -> &'static str {
        match self {
            Action::Start => "start",
            Action::TurnOff => "turn off",
            Action::ShutDown => "shut down",
            Action::ForceShutDown => "force a shut down of",
            Action::Save => "save",
            Action::Pause => "pause",
            Action::Resume => "resume",
            Action::Reset => "reset",
            Action::DiscardSavedState => "discard the saved state of",
            Action::Delete => "delete",
            Action::ChangeHardware => "change the hardware of",
            Action::ChangeMedia => "change media of",
            Action::GuestService => "use the integration services of",
        }
    }
}

impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.verb())
    }
}

/// Why an action is refused in a state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot {action} a VM that is {state}: {why}")]
pub struct Refusal {
    pub state: VmState,
    pub action: Action,
    pub why: &'static str,
}

/// Whether a QEMU (and so a worker) exists for a VM in this state. A Critical VM
/// may still have one; the caller knows (it holds the worker link).
pub fn has_qemu(state: VmState) -> bool {
    matches!(
        state,
        VmState::Starting
            | VmState::Running
            | VmState::Paused
            | VmState::Saving
            | VmState::Stopping
            | VmState::Resetting
    )
}

/// Whether `action` may start while the VM is in `state`.
pub fn allows(state: VmState, action: Action) -> Result<(), Refusal> {
    use Action as A;
    use VmState as S;
    let why: &'static str = match (action, state) {
        (A::Start, S::Off | S::Saved | S::Critical) => return Ok(()),
        (A::Start, S::Starting) => "it is already starting",
        (A::Start, _) => "it is already running (turn it off or shut it down first)",

        (A::TurnOff, s) if has_qemu(s) => return Ok(()),
        // What is left of a failed VM (a hung worker) can always be pulled.
        (A::TurnOff, S::Critical) => return Ok(()),
        (A::TurnOff, S::Saved) => "it is not running (discard its saved state instead)",
        (A::TurnOff, _) => "it is not running",

        (A::ShutDown, S::Running) => return Ok(()),
        (A::ForceShutDown, S::Running | S::Stopping) => return Ok(()),
        (A::ShutDown | A::ForceShutDown, S::Paused) => {
            "a paused guest cannot shut down (resume it, or turn it off)"
        }
        (A::ShutDown, S::Stopping) => "it is already stopping (use --force to turn it off)",
        (A::ShutDown | A::ForceShutDown, _) => "its guest is not running",

        (A::Save, S::Running | S::Paused) => return Ok(()),
        (A::Save, S::Saved) => "it is already saved",
        (A::Save, _) => "only a running or paused VM can be saved",

        (A::Pause, S::Running) => return Ok(()),
        (A::Pause, S::Paused) => "it is already paused",
        (A::Pause, _) => "only a running VM can be paused",

        (A::Resume, S::Paused) => return Ok(()),
        (A::Resume, S::Running) => "it is not paused",
        (A::Resume, _) => "only a paused VM can be resumed",

        (A::Reset, S::Running | S::Paused) => return Ok(()),
        (A::Reset, S::Resetting) => "it is already resetting",
        (A::Reset, _) => "only a running or paused VM can be reset",

        (A::DiscardSavedState, S::Saved) => return Ok(()),
        (A::DiscardSavedState, _) => "it has no saved state",

        (A::Delete, S::Off | S::Saved | S::Critical) => return Ok(()),
        (A::Delete, _) => "it is running (turn it off first)",

        (A::ChangeHardware, S::Off) => return Ok(()),
        (A::ChangeHardware, S::Saved) => {
            "its saved state expects the current hardware (discard the saved state first)"
        }
        (A::ChangeHardware, _) => "it is not off",

        (A::ChangeMedia, S::Off | S::Running | S::Paused) => return Ok(()),
        (A::ChangeMedia, _) => "media change only when off, running or paused",

        (A::GuestService, S::Running) => return Ok(()),
        (A::GuestService, _) => "its guest is not running",
    };
    Err(Refusal { state, action, why })
}

#[cfg(test)]
mod tests {
    use super::*;
    use Action as A;
    use VmState as S;

    /// The expected table, written from Hyper-V's documented behaviour, one row per
    /// action listing the states that allow it.
    fn expected(a: Action) -> &'static [VmState] {
        match a {
            // Start from Off, or restore from Saved; Critical is our failure state
            // and starting again is its recovery.
            A::Start => &[S::Off, S::Saved, S::Critical],
            // Turn Off pulls the plug wherever a virtual machine exists, cancelling
            // a save, shut down or reset in progress.
            A::TurnOff => &[
                S::Starting,
                S::Running,
                S::Paused,
                S::Saving,
                S::Stopping,
                S::Resetting,
                S::Critical,
            ],
            A::ShutDown => &[S::Running],
            A::ForceShutDown => &[S::Running, S::Stopping],
            A::Save => &[S::Running, S::Paused],
            A::Pause => &[S::Running],
            A::Resume => &[S::Paused],
            A::Reset => &[S::Running, S::Paused],
            A::DiscardSavedState => &[S::Saved],
            // "Delete requires Off or Saved" (plus a failed VM).
            A::Delete => &[S::Off, S::Saved, S::Critical],
            A::ChangeHardware => &[S::Off],
            A::ChangeMedia => &[S::Off, S::Running, S::Paused],
            A::GuestService => &[S::Running],
        }
    }

    #[test]
    fn table_is_hyperv_semantics() {
        for a in ALL_ACTIONS {
            for s in ALL_STATES {
                let want = expected(a).contains(&s);
                let got = allows(s, a);
                assert_eq!(got.is_ok(), want, "{a:?} in {s:?}: {got:?}");
                if let Err(r) = got {
                    assert_eq!((r.state, r.action), (s, a));
                    let msg = r.to_string();
                    assert!(msg.contains(&s.to_string()), "{msg}");
                    assert!(!r.why.is_empty());
                }
            }
        }
    }

    #[test]
    fn turn_off_wherever_qemu_exists() {
        for s in ALL_STATES.into_iter().filter(|s| has_qemu(*s)) {
            assert!(allows(s, A::TurnOff).is_ok(), "{s:?}");
        }
        assert!(allows(S::Off, A::TurnOff).is_err());
        assert!(allows(S::Saved, A::TurnOff).is_err());
    }

    #[test]
    fn refusal_names_state_and_action() {
        let r = allows(S::Paused, A::ShutDown).unwrap_err();
        assert_eq!(
            r.to_string(),
            "cannot shut down a VM that is Paused: a paused guest cannot shut down (resume it, or turn it off)"
        );
        let j = serde_json::to_string(&A::DiscardSavedState).unwrap();
        assert_eq!(j, "\"discard_saved_state\"");
    }
}
