#!/usr/bin/env bash
# Builds the four packages into target/packages/:
#   walship_VERSION_ARCH.deb, walship-replicator_VERSION_all.deb   (dpkg-buildpackage -b, debian/)
#   walship-VERSION-1.ARCH.rpm, walship-replicator-VERSION-1.noarch.rpm  (rpmbuild, packaging/rpm/)
# and lints them (lintian, rpmlint): any lintian error or warning, or rpmlint error or warning,
# fails the build.
#
#   packaging/build.sh            # both formats
#   packaging/build.sh deb        # or only one
#   packaging/build.sh rpm
#
# Needs (Debian/Ubuntu): debhelper (>= 13), dpkg-dev, fakeroot, libssl-dev, pkg-config, rpm,
# lintian, rpmlint, and cargo on PATH (rustup). `packaging/build.sh --install-deps` installs the
# Debian packages. cargo may fetch crates from crates.io (CARGO_NET_OFFLINE=true forbids it).
#
# The sources are staged from git (tracked and untracked-but-not-ignored files of the working
# tree) into target/pkgbuild/, because dpkg-buildpackage writes its results into the parent of
# the source directory. Both builds share one cargo target directory (target/, or
# CARGO_TARGET_DIR) for the .deb, target/rpm-cargo (RPM_CARGO_TARGET_DIR) for the .rpm; both
# builds use the C flags of dpkg-buildflags (hardening for the bundled C code).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

if [ "${1:-}" = --install-deps ]; then
  apt-get install -y --no-install-recommends debhelper dpkg-dev fakeroot libssl-dev pkg-config \
    rpm lintian rpmlint
  shift
fi
formats=("${@:-deb rpm}")
formats=(${formats[*]})

version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
out=$root/target/packages
stage=$root/target/pkgbuild
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$root/target}
# The flags dpkg-buildpackage sets anyway (hardening for the bundled C: SQLite, libssh2, zstd);
# exported for rpmbuild too.
eval "$(dpkg-buildflags --export=sh)"

mkdir -p "$out"
rm -rf "$stage"
mkdir -p "$stage/walship-$version"
git ls-files -z --cached --others --exclude-standard |
  grep -zv '^target/' |
  while IFS= read -r -d '' f; do [ -e "$f" ] || [ -L "$f" ] && printf '%s\0' "$f"; done |
  tar --null -T - -cf - | tar -xf - -C "$stage/walship-$version"

status=0
for fmt in "${formats[@]}"; do
  case $fmt in
  deb)
    rm -f "$out"/walship*.deb
    (cd "$stage/walship-$version" && dpkg-buildpackage -b -us -uc)
    cp "$stage"/walship_"$version"_*.deb "$stage"/walship-replicator_"$version"_all.deb "$out"/
    echo "== lintian"
    # Info tags (I:) are reported, not failures: see packaging/README.md.
    if ! lintian --fail-on error,warning -I "$stage"/walship_"$version"_*.changes; then
      echo "lintian: errors or warnings" >&2
      status=1
    fi
    ;;
  rpm)
    rm -f "$out"/walship*.rpm
    top=$stage/rpmbuild
    mkdir -p "$top"/{SOURCES,SPECS,BUILD,RPMS,SRPMS}
    tar -C "$stage" -czf "$top/SOURCES/walship-$version.tar.gz" "walship-$version"
    cp sysusers.d/walship-replicator.conf "$top/SOURCES/walship-replicator.sysusers"
    cp packaging/rpm/walship.spec "$top/SPECS/"
    # --nodeps: BuildRequires name Fedora packages; this may be a Debian machine.
    # A cargo target directory of its own: rpmbuild exports a PKG_CONFIG_PATH that differs
    # from dpkg-buildpackage's, and openssl-sys/libssh2-sys rebuild on any change of it.
    CARGO_TARGET_DIR=${RPM_CARGO_TARGET_DIR:-$root/target/rpm-cargo} \
      rpmbuild -bb --nodeps --define "_topdir $top" "$top/SPECS/walship.spec"
    find "$top/RPMS" -name 'walship*.rpm' -exec cp {} "$out"/ \;
    echo "== rpmlint"
    if ! rpmlint -c packaging/rpm/rpmlint.toml "$out"/walship*.rpm; then
      echo "rpmlint: errors or warnings" >&2
      status=1
    fi
    ;;
  *) echo "unknown format $fmt (deb, rpm)" >&2; exit 2 ;;
  esac
done
ls -l "$out"
exit $status
