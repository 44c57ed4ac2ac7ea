#!/bin/bash
# cipher.sh : the SSH cipher walship's SFTP uses (chacha20-poly1305@openssh.com), MB/s on 32 KiB
# inputs: libssh2's portable ChaCha20 and Poly1305 (vendor/libssh2-sys/libssh2/src/chacha.c and
# poly1305.c compiled alone, gcc -O2, without LIBSSH2_OPENSSL, so without the patch's OpenSSL
# path) against OpenSSL's, which the patch hands inputs of >= 256 / >= 512 bytes to
# (vendor/README.md). Needs gcc and libssl-dev.
source "$(dirname "$0")/common.sh"
SRC="$REPO/vendor/libssh2-sys/libssh2/src"
cp "$SRC/chacha.c" "$SRC/chacha.h" "$SRC/poly1305.c" "$SRC/poly1305.h" "$T/"
# The two files need only these from libssh2's private header.
printf '#include <stdint.h>\n#include <string.h>\n#include <stddef.h>\n#define ssh2_explicit_zero(b, n) memset(b, 0, n)\n' >"$T/libssh2_priv.h"
cat >"$T/main.c" <<'C'
#include <openssl/evp.h>
#include <stdio.h>
#include <time.h>
#include "chacha.h"
#include "poly1305.h"
#define N 32768
#define IT 20000
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec / 1e9; }
static double mbs(double t0, double t1) { return (double)N * IT / (t1 - t0) / 1e6; }
int main(void) {
    static unsigned char m[N];
    unsigned char key[32] = {1}, iv8[8] = {0}, iv16[16] = {0}, tag[16];
    struct chacha_ctx x;
    size_t ol;
    int i, outl;
    double t0, t1, t2, t3, t4;
    chacha_keysetup(&x, key, 256);
    t0 = now();
    for(i = 0; i < IT; i++) { chacha_ivsetup(&x, iv8, NULL); chacha_encrypt_bytes(&x, m, m, N); }
    t1 = now();
    for(i = 0; i < IT; i++) poly1305_auth(tag, m, N, key);
    t2 = now();
    for(i = 0; i < IT; i++) {   /* as the patch does it: a context per call */
        EVP_CIPHER_CTX *c = EVP_CIPHER_CTX_new();
        EVP_EncryptInit_ex(c, EVP_chacha20(), NULL, key, iv16);
        EVP_EncryptUpdate(c, m, &outl, m, N);
        EVP_CIPHER_CTX_free(c);
    }
    t3 = now();
    for(i = 0; i < IT; i++) EVP_Q_mac(NULL, "POLY1305", NULL, NULL, NULL, key, 32, m, N, tag, 16, &ol);
    t4 = now();
    double pc = mbs(t0, t1), pp = mbs(t1, t2), oc = mbs(t2, t3), op = mbs(t3, t4);
    double ppair = 1 / (1 / pc + 1 / pp), opair = 1 / (1 / oc + 1 / op);
    printf("                 ChaCha20   Poly1305   the pair (MB/s, 32 KiB inputs)\n");
    printf("libssh2 portable %8.0f   %8.0f   %8.0f\n", pc, pp, ppair);
    printf("OpenSSL          %8.0f   %8.0f   %8.0f   (%.1fx)\n", oc, op, opair, opair / ppair);
    return 0;
}
C
gcc -O2 -I"$T" -o "$T/cipher" "$T/main.c" "$T/chacha.c" "$T/poly1305.c" -lcrypto
echo "# cipher.sh  $(date -u +%FT%TZ)  $(nproc) cores  $(openssl version)"
"$T/cipher"
