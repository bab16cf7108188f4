#!/usr/bin/env bash
# Build the demo APK without Gradle or Maven (neither is reachable here) and check it.
#
#   android_demo/build_offline.sh BUNDLE.tflite [OUT_DIR]     (OUT_DIR defaults to android_demo/build/offline)
#
# android.jar (API 23) and dx come from Debian 11's packages, sha256-checked and cached under
# ~/.cache/edge-pipeline/android; aapt, apksigner, zipalign and dexdump from Debian 12's (installed with apt
# when missing and running as root). The app compiles against compile-only stand-ins for the LiteRT classes
# (offline/stubs/), which never go into the APK: this proves the app's own code builds against the real
# Android API and packages the bundle intact, not that LiteRT runs it on a phone.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
BUNDLE=${1:?usage: build_offline.sh BUNDLE.tflite [OUT_DIR]}
OUT=${2:-$HERE/build/offline}
CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/edge-pipeline/android
APP=$HERE/app
ASSET=model.tflite  # the name MainActivity opens

fail() { echo "build_offline: FAILED: $*" >&2; exit 1; }
ok() { echo "ok: $*"; }

[ -f "$BUNDLE" ] || fail "$BUNDLE: no such bundle"
BUNDLE=$(cd "$(dirname "$BUNDLE")" && pwd)/$(basename "$BUNDLE")

# --- Tools from Debian 12 ----------------------------------------------------------------------------------
for tool in javac java jar keytool; do
    command -v $tool >/dev/null || fail "$tool not found: install a JDK (Debian: apt-get install default-jdk-headless)"
done
missing=()
for tool in aapt apksigner zipalign dexdump; do
    command -v $tool >/dev/null || missing+=("$tool")  # each tool's Debian package has the tool's name
done
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
        echo "installing ${missing[*]} with apt-get"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    else
        fail "missing ${missing[*]}: run as root, or: sudo apt-get install ${missing[*]}"
    fi
fi

# --- android.jar and dx from Debian 11 (bookworm dropped them), cached ---------------------------------------
ANDROID_JAR=$CACHE/root/usr/share/java/com.android.android-23.jar
DX_JAR=$CACHE/root/usr/lib/android-sdk/build-tools/debian/lib/dx.jar
DEBS="8af1b6df556971dda0a6da3536ea526a838e0c363afcdd454213d8bce94793e3  libandroid-23-java_6.0.1+r72-6_all.deb
8fc128db7c27253d963eb9b33de79b197162a4749d2ba69019b2fd0664cbd7fe  dalvik-exchange_10.0.0+r36-1_all.deb"
if [ ! -f "$ANDROID_JAR" ] || [ ! -f "$DX_JAR" ]; then
    echo "fetching android.jar and dx from Debian bullseye into $CACHE"
    mkdir -p "$CACHE/lists/partial" "$CACHE/cache/archives/partial" "$CACHE/debs"
    # A private sources list and state: the system's apt configuration is left alone.
    echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bullseye main" \
        > "$CACHE/sources.list"
    apt_private=(-o "Dir::Etc::SourceList=$CACHE/sources.list" -o Dir::Etc::SourceParts=/dev/null
        -o "Dir::State::Lists=$CACHE/lists" -o "Dir::Cache=$CACHE/cache")
    apt-get "${apt_private[@]}" update -qq
    (cd "$CACHE/debs" && apt-get "${apt_private[@]}" download libandroid-23-java=6.0.1+r72-6 dalvik-exchange=10.0.0+r36-1)
    (cd "$CACHE/debs" && echo "$DEBS" | sha256sum --check --quiet) || fail "Debian packages do not match their sha256"
    rm -rf "$CACHE/root"
    for deb in "$CACHE"/debs/*.deb; do dpkg-deb -x "$deb" "$CACHE/root"; done
fi
(cd "$CACHE/debs" && echo "$DEBS" | sha256sum --check --quiet) || fail "cached Debian packages do not match their sha256"
ok "android.jar (API 23) and dx from sha256-checked Debian bullseye packages"

# --- The app's identity, from app/build.gradle (the one place it is written) ---------------------------------
gradle_value() { sed -n "s/^ *$1 *[= ]*['\"]*\([^'\"]*\)['\"]* *$/\1/p" "$APP/build.gradle" | head -1; }
APP_ID=$(gradle_value applicationId)
MIN_SDK=$(gradle_value minSdk)
TARGET_SDK=$(gradle_value targetSdk)
VERSION_CODE=$(gradle_value versionCode)
VERSION_NAME=$(gradle_value versionName)
[ -n "$APP_ID" ] && [ -n "$MIN_SDK" ] && [ -n "$TARGET_SDK" ] || fail "cannot read applicationId/minSdk/targetSdk from app/build.gradle"
ACTIVITY=$APP_ID.MainActivity

# --- Build -------------------------------------------------------------------------------------------------
WORK=$OUT/work
rm -rf "$WORK"
mkdir -p "$WORK/gen" "$WORK/stubs" "$WORK/classes" "$WORK/assets" "$WORK/unpacked"
# Gradle writes the package from build.gradle's namespace into the manifest; aapt needs it written in.
sed "s|<manifest |<manifest package=\"$APP_ID\" |" "$APP/src/main/AndroidManifest.xml" > "$WORK/AndroidManifest.xml"
cp "$BUNDLE" "$WORK/assets/$ASSET"

aapt package -f -m -J "$WORK/gen" -M "$WORK/AndroidManifest.xml" -S "$APP/src/main/res" -I "$ANDROID_JAR"
javac -nowarn -Xlint:-options -source 8 -target 8 -d "$WORK/stubs" $(find "$HERE/offline/stubs" -name '*.java')
javac -Xlint:-options -source 8 -target 8 -encoding UTF-8 -bootclasspath "$ANDROID_JAR" -cp "$WORK/stubs" \
    -d "$WORK/classes" $(find "$WORK/gen" "$APP/src/main/java" -name '*.java')
ok "the app's Java 8 sources compile against android.jar and the LiteRT stand-ins"
java -cp "$DX_JAR" com.android.dx.command.Main --dex --min-sdk-version="$MIN_SDK" \
    --output="$WORK/classes.dex" "$WORK/classes"
aapt package -f -0 tflite -M "$WORK/AndroidManifest.xml" -S "$APP/src/main/res" -A "$WORK/assets" -I "$ANDROID_JAR" \
    --min-sdk-version "$MIN_SDK" --target-sdk-version "$TARGET_SDK" \
    --version-code "$VERSION_CODE" --version-name "$VERSION_NAME" -F "$WORK/unsigned.apk"
(cd "$WORK" && aapt add unsigned.apk classes.dex >/dev/null)
zipalign -f -p 4 "$WORK/unsigned.apk" "$WORK/aligned.apk"
# A throwaway signing key, made afresh for every build.
keytool -genkeypair -keystore "$WORK/throwaway.p12" -storetype PKCS12 -storepass throwaway -alias demo \
    -keyalg RSA -keysize 2048 -validity 365 -dname "CN=edge-pipeline offline build" >/dev/null 2>&1
APK=$OUT/edge-pipeline-demo.apk
apksigner sign --ks "$WORK/throwaway.p12" --ks-pass pass:throwaway --out "$APK" "$WORK/aligned.apk"
echo "built $APK"

# --- Checks ------------------------------------------------------------------------------------------------
apksigner verify "$APK" || fail "apksigner verify rejects the APK"
ok "apksigner verify accepts the signature"
zipalign -c -p 4 "$APK" || fail "the APK is not 4-byte aligned"
ok "zipalign: entries 4-byte aligned"

badging=$(aapt dump badging "$APK")
for expected in "package: name='$APP_ID'" "launchable-activity: name='$ACTIVITY'" \
                "sdkVersion:'$MIN_SDK'" "targetSdkVersion:'$TARGET_SDK'" "uses-permission: name='android.permission.CAMERA'"; do
    grep -qF "$expected" <<<"$badging" || fail "aapt dump badging lacks: $expected"
    ok "aapt dump badging: $expected"
done

(cd "$WORK/unpacked" && jar xf "$APK" "assets/$ASSET" classes.dex)
cmp -s "$BUNDLE" "$WORK/unpacked/assets/$ASSET" || fail "assets/$ASSET differs from $BUNDLE"
ok "assets/$ASSET is byte-identical to $(basename "$BUNDLE") ($(wc -c < "$BUNDLE") bytes)"
aapt list -v "$APK" | grep -E " Stored .* assets/$ASSET\$" >/dev/null || fail "assets/$ASSET is compressed"
ok "assets/$ASSET is stored uncompressed (it can be memory-mapped)"

classes=$(dexdump "$WORK/unpacked/classes.dex" | sed -n "s/^ *Class descriptor *: *'\(.*\)'/\1/p")
grep -q "^Lorg/tensorflow/" <<<"$classes" && fail "LiteRT stand-ins leaked into the dex: $(grep '^Lorg/tensorflow/' <<<"$classes" | tr '\n' ' ')"
ok "dexdump: no org.tensorflow stand-in in classes.dex"
for class in "L${ACTIVITY//.//};" "Lcom/edgepipeline/core/BundleInfo;"; do
    grep -qxF "$class" <<<"$classes" || fail "dexdump: $class missing from classes.dex"
    ok "dexdump: $class is in classes.dex"
done
echo "all checks passed: $APK"
