// convert IN.cu OUT.cpp: rewrites a CUDA source for the host emulator (tools/cuda-emu).
//   kernel<<<grid, block[, smem[, stream]]>>>(args)
//       -> emu_launch("kernel", kernel, grid, block, smem, stream, args)
//   extern __shared__ [__align__(N)] T name[];
//       -> T *name = (T *)emu_dyn_smem;            (the block's dynamic shared memory)
//   __shared__ [__align__(N) | alignas(N)] T name[...];
//       -> static [the same alignment] T name[...]; registered with the emulator, which fills
//          it with a poison pattern before every block (shared memory is not initialised on a
//          GPU). The dynamic shared memory is 128-byte aligned (emu_runtime.cpp).
// Everything else is copied as it is; the emulator's headers supply the CUDA built-ins.
// Comments are copied untouched (a "<<<" or "__shared__" inside one is not rewritten).
#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *src;
static size_t len, pos;
static FILE *out;

static void die_(const char *what) {
    fprintf(stderr, "convert: %s at byte %zu\n", what, pos);
    exit(1);
}

static int at_(const char *s) {
    return strncmp(src + pos, s, strlen(s)) == 0;
}
static void skip_ws_(void) {
    while (pos < len && isspace((unsigned char)src[pos])) pos++;
}
static int is_ident_(char c) {
    return isalnum((unsigned char)c) || c == '_' || c == ':';
}

// __shared__ declarations; pos is at "__shared__", `ext` says an "extern " came before (already
// consumed).
static void shared_(int ext) {
    pos += strlen("__shared__");
    skip_ws_();
    size_t align = pos, align_len = 0; // the alignment, kept on the static array
    if (at_("__align__(") || at_("alignas(")) {
        while (pos < len && src[pos] != ')') pos++;
        pos++;
        align_len = pos - align;
        skip_ws_();
    }
    // TYPE NAME DIMS ';': the name is the identifier before the first '[' (or '=', or the
    // end), the type everything before it (several words: "unsigned char", "const T *")
    const size_t t0 = pos;
    while (pos < len && src[pos] != ';') pos++;
    if (pos >= len) die_("unterminated __shared__ declaration");
    size_t d = t0;
    while (d < pos && src[d] != '[' && src[d] != '=') d++;
    size_t ne = d;
    while (ne > t0 && isspace((unsigned char)src[ne - 1])) ne--;
    size_t nb = ne;
    while (nb > t0 && (isalnum((unsigned char)src[nb - 1]) || src[nb - 1] == '_')) nb--;
    size_t te = nb;
    while (te > t0 && isspace((unsigned char)src[te - 1])) te--;
    if (nb == ne || te == t0) die_("expected a type and a name after __shared__");
    const int tl = (int)(te - t0), nl = (int)(ne - nb);
    const char *type = src + t0, *name = src + nb;
    if (ext) {
        fprintf(out, "%.*s *%.*s = (%.*s *)emu_dyn_smem;", tl, type, nl, name, tl, type);
    } else {
        fprintf(out,
                "%.*s%sstatic %.*s %.*s%.*s; static const bool %.*s_emu_reg_ = "
                "(emu_shared_register((void *)&%.*s, sizeof %.*s), true); (void)%.*s_emu_reg_;",
                (int)align_len, src + align, align_len ? " " : "", tl, type, nl, name,
                (int)(pos - ne), src + ne, nl, name, nl, name, nl, name, nl, name);
    }
    pos++; // ';'
}

// A launch; pos is at "<<<" and the kernel name was already copied to the output, so the
// output is rewound to the name's start (out_name).
static void launch_(const char *name) {
    pos += 3;
    char parts[4][512];
    int np = 0, depth = 0;
    size_t k = 0;
    while (!(depth == 0 && at_(">>>"))) {
        if (pos >= len) die_("unterminated <<< >>>");
        char c = src[pos++];
        if (c == '(' || c == '[' || c == '{') depth++;
        if (c == ')' || c == ']' || c == '}') depth--;
        if (c == ',' && depth == 0) {
            parts[np][k] = 0;
            if (++np == 4) die_("more than 4 launch arguments");
            k = 0;
            continue;
        }
        if (k + 1 >= sizeof parts[0]) die_("launch argument too long");
        parts[np][k++] = c;
    }
    parts[np++][k] = 0;
    pos += 3;
    for (; np < 4; np++) strcpy(parts[np], "0");
    skip_ws_();
    if (src[pos] != '(') die_("launch without arguments");
    pos++;
    size_t q = pos;
    while (q < len && isspace((unsigned char)src[q])) q++;
    fprintf(out, "emu_launch(\"%s\", %s", name, name);
    for (int i = 0; i < 4; i++) {
        char *p = parts[i];
        while (isspace((unsigned char)*p)) p++;
        size_t n = strlen(p);
        while (n && isspace((unsigned char)p[n - 1])) p[--n] = 0;
        fprintf(out, ", %s", p);
    }
    if (src[q] != ')') fputs(", ", out);
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: convert IN.cu OUT.cpp\n");
        return 2;
    }
    FILE *f = fopen(argv[1], "rb");
    if (!f) {
        perror(argv[1]);
        return 1;
    }
    fseek(f, 0, SEEK_END);
    len = (size_t)ftell(f);
    fseek(f, 0, SEEK_SET);
    char *buf = malloc(len + 1);
    if (!buf || fread(buf, 1, len, f) != len) {
        fprintf(stderr, "convert: cannot read %s\n", argv[1]);
        return 1;
    }
    buf[len] = 0;
    fclose(f);
    src = buf;
    // the output goes to memory first: a launch rewinds over its kernel name
    char *obuf = NULL;
    size_t olen = 0;
    out = open_memstream(&obuf, &olen);
    char last_ident[128] = "";
    size_t last_ident_out = 0; // output offset where the last identifier started
    while (pos < len) {
        if (at_("//")) { // line comment
            while (pos < len && src[pos] != '\n') fputc(src[pos++], out);
        } else if (at_("/*")) {
            const char *e = strstr(src + pos + 2, "*/");
            size_t end = e ? (size_t)(e - src) + 2 : len;
            fwrite(src + pos, 1, end - pos, out);
            pos = end;
        } else if (src[pos] == '"' || src[pos] == '\'') { // literal, with escapes
            char qch = src[pos];
            fputc(src[pos++], out);
            while (pos < len && src[pos] != qch) {
                if (src[pos] == '\\') fputc(src[pos++], out);
                fputc(src[pos++], out);
            }
            if (pos < len) fputc(src[pos++], out);
        } else if (at_("extern") && !is_ident_(src[pos + 6])) {
            size_t save = pos;
            pos += 6;
            skip_ws_();
            if (at_("__shared__")) {
                fflush(out);
                shared_(1);
            } else {
                pos = save;
                fputs("extern", out);
                pos += 6;
            }
        } else if (at_("__shared__") && (pos == 0 || !is_ident_(src[pos - 1]))) {
            shared_(0);
        } else if (at_("<<<")) {
            if (!last_ident[0]) die_("<<< without a kernel name");
            fflush(out);
            // drop the name (and any blank after it) already written
            fseek(out, (long)last_ident_out, SEEK_SET);
            launch_(last_ident);
            last_ident[0] = 0;
        } else if (is_ident_(src[pos]) && !isdigit((unsigned char)src[pos])) {
            fflush(out);
            last_ident_out = olen;
            size_t k = 0;
            while (pos < len && is_ident_(src[pos])) {
                if (k + 1 < sizeof last_ident) last_ident[k++] = src[pos];
                fputc(src[pos++], out);
            }
            last_ident[k] = 0;
        } else {
            if (!isspace((unsigned char)src[pos])) last_ident[0] = 0;
            fputc(src[pos++], out);
        }
    }
    fclose(out);
    FILE *o = fopen(argv[2], "wb");
    if (!o || fwrite(obuf, 1, olen, o) != olen || fclose(o) != 0) {
        perror(argv[2]);
        return 1;
    }
    free(obuf);
    free(buf);
    return 0;
}
