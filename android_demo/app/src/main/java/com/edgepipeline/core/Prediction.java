package com.edgepipeline.core;

import java.util.ArrayList;
import java.util.List;
import java.util.Locale;

/** One ranked answer: a label, its index in the model's output and its score. */
public final class Prediction {
    public final String label;
    public final int index;
    public final float score;

    public Prediction(String label, int index, float score) {
        this.label = label;
        this.index = index;
        this.score = score;
    }

    /**
     * The k best scores, best first; equal scores keep the lower index first (serve's stable argsort).
     * Compared with `>` rather than Float.compare so that 0.0 and -0.0 tie, as they do in numpy.
     */
    public static List<Prediction> topK(float[] scores, List<String> labels, int k) {
        int n = Math.max(0, Math.min(k, scores.length));
        boolean[] taken = new boolean[scores.length];
        List<Prediction> best = new ArrayList<Prediction>(n);
        for (int rank = 0; rank < n; rank++) {
            int top = -1;
            for (int i = 0; i < scores.length; i++) {
                if (!taken[i] && (top < 0 || scores[i] > scores[top])) {
                    top = i;
                }
            }
            taken[top] = true;
            best.add(new Prediction(labels.get(top), top, scores[top]));
        }
        return best;
    }

    @Override
    public String toString() {
        return String.format(Locale.ROOT, "%s (%d): %.6f", label, index, score);
    }
}
