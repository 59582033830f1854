// Reference fixture generator: runs llama.cpp's own tokenizer and forward pass on a GGUF model and
// writes token ids, greedy continuations and per-step top-k logits as JSON. Built and run by
// scripts/make-fixtures; the output is the independent reference prfaas's tests compare against.
//
// usage: llama_fixtures MODEL.gguf INPUT.json > OUTPUT.json
//   INPUT: {"tokenize": [{"text": "...", "parse_special": true}, ...],
//           "greedy":   [{"prompt": "...", "parse_special": true, "n_predict": 16, "top_k": 5}, ...]}
//   Every case may also say "add_special": true (BOS as the model's tokenizer adds it; Gemma);
//   the default is false.
#include "llama.h"
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <numeric>
#include <string>
#include <vector>

using json = nlohmann::ordered_json;

static std::vector<llama_token> tokenize(const llama_vocab * vocab, const std::string & text, bool add_special,
                                         bool parse_special) {
    int n = -llama_tokenize(vocab, text.data(), (int32_t) text.size(), nullptr, 0, add_special, parse_special);
    std::vector<llama_token> out(std::max(n, 0));
    int m = llama_tokenize(vocab, text.data(), (int32_t) text.size(), out.data(), (int32_t) out.size(), add_special,
                           parse_special);
    if (m < 0) { fprintf(stderr, "tokenize failed\n"); exit(1); }
    out.resize(m);
    return out;
}

static void quiet(ggml_log_level, const char *, void *) {}

int main(int argc, char ** argv) {
    if (argc != 3) { fprintf(stderr, "usage: %s MODEL INPUT.json\n", argv[0]); return 2; }
    llama_log_set(quiet, nullptr);
    llama_backend_init();
    auto mparams = llama_model_default_params();
    llama_model * model = llama_model_load_from_file(argv[1], mparams);
    if (!model) { fprintf(stderr, "cannot load model\n"); return 1; }
    const llama_vocab * vocab = llama_model_get_vocab(model);
    const int n_vocab = llama_vocab_n_tokens(vocab);
    std::ifstream in(argv[2]);
    json input = json::parse(in);
    json out;
    const char * tmpl = llama_model_chat_template(model, nullptr);
    out["chat_template"] = tmpl ? tmpl : "";
    out["tokenize"] = json::array();
    for (auto & t : input["tokenize"]) {
        std::string text = t["text"];
        bool ps = t.value("parse_special", true);
        bool as = t.value("add_special", false);
        json row = {{"text", text}, {"parse_special", ps}};
        if (as) row["add_special"] = true;
        row["ids"] = tokenize(vocab, text, as, ps);
        out["tokenize"].push_back(row);
    }
    out["greedy"] = json::array();
    for (auto & g : input["greedy"]) {
        std::string prompt = g["prompt"];
        bool ps = g.value("parse_special", true);
        int n_predict = g.value("n_predict", 16);
        int top_k = g.value("top_k", 5);
        auto cparams = llama_context_default_params();
        cparams.n_ctx = 2048;
        cparams.n_batch = 2048;
        cparams.n_threads = 2;
        cparams.n_threads_batch = 2;
        llama_context * ctx = llama_init_from_model(model, cparams);
        bool as = g.value("add_special", false);
        std::vector<llama_token> ids = tokenize(vocab, prompt, as, ps);
        std::vector<llama_token> cont;
        json steps = json::array();
        llama_batch batch = llama_batch_get_one(ids.data(), (int32_t) ids.size());
        llama_token next = 0;
        for (int i = 0; i < n_predict; i++) {
            if (llama_decode(ctx, batch) != 0) { fprintf(stderr, "decode failed\n"); return 1; }
            const float * logits = llama_get_logits_ith(ctx, -1);
            std::vector<int> idx(n_vocab);
            std::iota(idx.begin(), idx.end(), 0);
            std::partial_sort(idx.begin(), idx.begin() + top_k, idx.end(),
                              [&](int a, int b) { return logits[a] > logits[b] || (logits[a] == logits[b] && a < b); });
            json top = json::array();
            for (int k = 0; k < top_k; k++) top.push_back({idx[k], logits[idx[k]]});
            steps.push_back(top);
            next = idx[0];
            cont.push_back(next);
            if (llama_vocab_is_eog(vocab, next)) break;
            batch = llama_batch_get_one(&cont.back(), 1);
        }
        out["greedy"].push_back({{"prompt", prompt}, {"parse_special", ps}, {"prompt_ids", ids},
                                 {"continuation_ids", cont}, {"top_logits", steps}});
        llama_free(ctx);
    }
    printf("%s\n", out.dump(1).c_str());
    llama_model_free(model);
    return 0;
}
