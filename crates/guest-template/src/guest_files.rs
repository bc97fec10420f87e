//! Scripts and config files placed into the guest's initramfs.

/// PID 1. The initramfs stays the root filesystem; /data is the ext4 disk.
pub const INIT: &str = r#"#!/bin/sh
# Ferrovisor guest template /init (busybox ash as PID 1).
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm /dev/virtio-ports
mount -t devpts devpts /dev/pts
mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /run
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /tmp
exec </dev/console >/dev/console 2>&1
dbg=""
case " $(cat /proc/cmdline) " in *" fv.debug "*) dbg=1 ;; esac
# Boot-phase timestamps on the console with `fv.debug` on the kernel command line.
t() { [ -z "$dbg" ] || echo "fv-init: $(cut -d' ' -f1 /proc/uptime) $*"; }
t start

# busybox poweroff/reboot/halt (without -f) signal PID 1: act on them.
trap 'exec /sbin/fv-halt poweroff' USR2
trap 'exec /sbin/fv-halt reboot' TERM
trap 'exec /sbin/fv-halt halt' USR1

# Modules in dependency order, computed at build time from .modinfo depends=.
# A failing insmod (no such hardware, e.g. hv_vmbus outside Hyper-V) is fine.
# Lines are "<group> <file>"; group "hv" (Hyper-V VMBus drivers and what only
# they need) is loaded only on Hyper-V.
hv=""
dmesg | grep -q "Hypervisor detected: Microsoft" && hv=1
while read -r grp m; do
  [ "$grp" = hv ] && [ -z "$hv" ] && continue
  t "insmod $m"
  insmod "/lib/modules/$m" 2>/dev/null
done </etc/fv-modules
t modules loaded

host=fvguest
for a in $(cat /proc/cmdline); do
  case "$a" in fv.hostname=*) host="${a#fv.hostname=}" ;; esac
done
hostname "$host"
echo "$host" >/etc/hostname

# No udev: name the virtio-serial ports ourselves.
for p in /sys/class/virtio-ports/*; do
  [ -e "$p/name" ] || continue
  n=$(cat "$p/name")
  [ -n "$n" ] && ln -sf "../${p##*/}" "/dev/virtio-ports/$n"
done

ip link set lo up
nic=""
for n in /sys/class/net/*; do
  n="${n##*/}"
  case "$n" in eth*|ens*|enp*|eno*) nic="$n"; break ;; esac
done
if [ -n "$nic" ]; then
  ip link set "$nic" up
  # Runs for the guest's lifetime (renewals); the lease is awaited below.
  udhcpc -f -i "$nic" -s /etc/udhcpc.script -t 4 -T 1 -A 2 -x "hostname:$host" >/run/udhcpc.log 2>&1 &
fi

t network started
# The data filesystem, found by label (partition 2 of the BIOS disk, or the
# separate data disk in the direct-boot variant). Disk probing can lag insmod.
dev=""
i=0
while [ $i -lt 50 ]; do
  dev=$(findfs LABEL=fvdata 2>/dev/null) && [ -n "$dev" ] && break
  i=$((i + 1))
  sleep 0.2
done
if [ -n "$dev" ]; then
  mount -t ext4 -o noatime "$dev" /data || echo "fv-init: cannot mount $dev on /data"
else
  echo "fv-init: no filesystem labelled fvdata"
fi

t data mounted
# ACPI power button -> /etc/acpi/PWRF/00000080 (busybox acpid's default map).
acpid -c /etc/acpi -l /run/acpid.log 2>/dev/null

port=/dev/virtio-ports/org.qemu.guest_agent.0
if [ -e "$port" ]; then
  /usr/sbin/qemu-ga -m virtio-serial -p "$port" -t /run -l /run/qemu-ga.log -f /run/qemu-ga.pid &
  ga=$!
  # Ready means the agent holds the port open.
  i=0
  while [ $i -lt 100 ]; do
    ls -l "/proc/$ga/fd" 2>/dev/null | grep -q vport && break
    i=$((i + 1))
    sleep 0.1
  done
else
  echo "fv-init: no virtio-serial port org.qemu.guest_agent.0; qemu-ga not started"
fi

t agent started
# Ready implies an address when a NIC exists (bounded: no DHCP server is fine).
if [ -n "$nic" ]; then
  i=0
  while [ $i -lt 50 ] && [ ! -e /run/fv-dhcp-bound ]; do
    i=$((i + 1))
    sleep 0.1
  done
fi

t network configured
echo "FERROVISOR-GUEST-READY" >/dev/ttyS0
[ -c /dev/ttyS0 ] || echo "FERROVISOR-GUEST-READY"

# Interactive shell on the console, restarted when it exits.
(while :; do setsid cttyhack sh -l; sleep 1; done) &
# Stay interruptible so the traps above run.
while :; do
  sleep 86400 &
  wait $!
done
"#;

/// Final step of every power-state change: flush, park /data read-only, act.
pub const FV_HALT: &str = r#"#!/bin/sh
act="${1:-poweroff}"
sync
mount -o remount,ro /data 2>/dev/null
sync
exec /usr/bin/busybox "$act" -f
"#;

/// qemu-ga runs `/sbin/shutdown -h -P +0 "..."` (or -r / -H). Answer at once
/// (exit 0) so the agent's waitpid sees success, then power off.
pub const SHUTDOWN: &str = r#"#!/bin/sh
act=poweroff
for a in "$@"; do
  case "$a" in
    -r) act=reboot ;;
    -H) act=halt ;;
  esac
done
(sleep 0.3; /sbin/fv-halt "$act") >/dev/null 2>&1 </dev/null &
exit 0
"#;

/// busybox acpid event action for the ACPI power button.
pub const ACPI_POWER: &str = "#!/bin/sh\nexec /sbin/fv-halt poweroff\n";

/// busybox udhcpc hook: configure address, default route and DNS.
pub const UDHCPC_SCRIPT: &str = r#"#!/bin/sh
case "$1" in
  deconfig)
    ifconfig "$interface" 0.0.0.0 up
    ;;
  bound|renew)
    ifconfig "$interface" "$ip" netmask "${subnet:-255.255.255.0}" up
    if [ -n "$router" ]; then
      while route del default dev "$interface" 2>/dev/null; do :; done
      for r in $router; do route add default gw "$r" dev "$interface"; break; done
    fi
    if [ -n "$dns" ]; then
      : >/etc/resolv.conf
      for d in $dns; do echo "nameserver $d" >>/etc/resolv.conf; done
    fi
    : >/run/fv-dhcp-bound
    ;;
esac
exit 0
"#;

pub const PROFILE: &str = "export PATH=/usr/sbin:/usr/bin:/sbin:/bin\nexport PS1='\\h:\\w# '\n";
pub const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n";
pub const GROUP: &str = "root:x:0:\n";
pub const HOSTS: &str = "127.0.0.1 localhost\n";
pub const HELLO: &str = "hello from the ferrovisor guest template\n";

/// For qemu-ga's guest-get-osinfo.
pub const OS_RELEASE: &str = "NAME=\"Ferrovisor guest template\"\nID=ferrovisor-template\nID_LIKE=debian\nVERSION_ID=1\nPRETTY_NAME=\"Ferrovisor guest template (Debian bookworm packages)\"\n";
